"""Model cards of distilled students: what a card states (``ModelCardData``) and its rendering.

``render_model_card`` fills the Jinja template ``student.md.j2`` from a ``ModelCardData``; ``card_data_from_trainer``
collects that data from a trainer, its args and its state. The templates live in the repository's top-level
``model_cards/`` folder and ship inside the package as ``hf_kd/model_cards/`` (see pyproject.toml): an installed
hf_kd reads them there, a source checkout reads the top-level folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import try_to_load_from_cache
from transformers.utils import logging

from .atomic import write_text_atomically
from .bridge import BRIDGE_REGISTRY
from .losses import Recipe
from .losses.registry import loss_class
from .papers import GKD, MGSR, Paper

logger = logging.get_logger(__name__)

TEMPLATE_NAME = "student.md.j2"
CARD_NAME = "README.md"
TEMPLATE_FOLDER = "model_cards"

# ---------------------------------------------------------------- recipe and methods


def papers_used(
    term_names: Iterable[str], bridge: str | None = None, scrg_corrections: int = 0, lmbda: float | None = None
) -> list[Paper]:
    """Papers a run used, as their classes declare them: the recipe's terms (in recipe order), the bridge, SCRG
    (MGSR) and on-policy data (GKD); each paper once."""
    papers = [loss_class(name).paper for name in term_names]
    if bridge in BRIDGE_REGISTRY:
        papers.append(BRIDGE_REGISTRY[bridge].paper)
    if scrg_corrections > 0:
        papers.append(MGSR)
    if lmbda:
        papers.append(GKD)
    return list(dict.fromkeys(paper for paper in papers if paper is not None))


def methods_used(
    term_names: Iterable[str], bridge: str | None = None, scrg_corrections: int = 0, lmbda: float | None = None
) -> list[str]:
    """Short names of the published methods a run used (see ``papers_used``)."""
    return [paper.method for paper in papers_used(term_names, bridge, scrg_corrections, lmbda)]


# ---------------------------------------------------------------- card data


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str | None) -> bool:
    """True for ``owner/name`` strings that are not an existing local path."""
    return bool(name) and _HUB_ID.match(name) is not None and not Path(name).exists()


def _front_matter(card: Path) -> dict[str, Any]:
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        loaded = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def origin_license(origin: str | None) -> str | None:
    """License declared by a model's card, read from a local folder or the local Hub cache (never the network)."""
    if not origin:
        return None
    card = Path(origin) / CARD_NAME
    if not card.is_file():
        if not looks_like_hub_id(origin):
            return None
        cached = try_to_load_from_cache(origin, CARD_NAME)
        if not isinstance(cached, str):
            return None
        card = Path(cached)
    license_id = _front_matter(card).get("license")
    return str(license_id) if license_id else None


@dataclass
class TrainingBudget:
    """How much training the student got."""

    steps: int | None = None
    max_steps: int | None = None
    epochs: float | None = None
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    learning_rate: float | None = None
    tokens_seen: int | None = None
    num_examples: int | None = None

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for the card; unknown values are left out."""
        rows = []
        if self.num_examples is not None:
            rows.append(("training examples", f"{self.num_examples:,}"))
        if self.steps is not None or self.max_steps is not None:
            done = "0" if self.steps is None else f"{self.steps:,}"
            rows.append(("optimizer steps", done + (f" of {self.max_steps:,}" if self.max_steps else "")))
        if self.epochs is not None:
            rows.append(("epochs", _fmt(self.epochs)))
        if self.per_device_batch_size is not None:
            effective = self.per_device_batch_size * self.gradient_accumulation_steps * self.world_size
            rows.append(
                (
                    "batch size",
                    f"{effective} ({self.per_device_batch_size} per device × {self.gradient_accumulation_steps} "
                    f"accumulation × {self.world_size} devices)",
                )
            )
        if self.learning_rate is not None:
            rows.append(("learning rate", _fmt(self.learning_rate)))
        if self.tokens_seen:
            rows.append(("tokens seen", f"{self.tokens_seen:,}"))
        return rows


RESULT_ROWS = {
    "teacher": "teacher",
    "student_before": "student before distillation",
    "student_after": "student after distillation",
}
_ROUGE_KEYS = {"rougel", "rougelf", "rougelsum"}
_KL_KEYS = {"kl", "heldoutkl", "klheldout", "evalkl"}


def _metric(values: dict[str, Any], accepted: set[str]) -> float | None:
    for key, value in values.items():
        norm = re.sub(r"[^a-z]", "", key.lower().removeprefix("eval_"))
        if norm in accepted and value is not None:
            return float(value)
    return None


@dataclass
class ModelCardData:
    """Everything a distilled student's card states.

    ``eval_results`` maps ``"teacher"``, ``"student_before"`` and ``"student_after"`` to metric dicts with a Rouge-L
    (``"rouge_l"``) and a held-out KL (``"kl"``) value; ``eval_``-prefixed names and ``"rougeL"`` are accepted too.
    """

    student_base_model: str | None = None
    teacher_model: str | None = None
    recipe: str = "jsd"
    bridge: str | None = None
    scrg_corrections: int = 0
    lmbda: float | None = None
    beta: float | None = None
    kd_temperature: float | None = None
    sampling_temperature: float | None = None
    datasets: list[str] = field(default_factory=list)
    budget: TrainingBudget = field(default_factory=TrainingBudget)
    eval_results: dict[str, dict[str, Any]] | None = None
    is_adapter: bool = False
    merged_adapter: bool = False
    license: str | None = None
    language: str | list[str] | None = None
    model_name: str | None = None
    repo_id: str | None = None
    tags: list[str] = field(default_factory=list)
    helpers_included: bool = False
    figures: list[str] = field(default_factory=list)

    @property
    def terms(self) -> list[tuple[float, str]]:
        """The recipe's (weight, name) terms, as the loss library parses it (``Recipe``)."""
        return [(term.weight, term.name) for term in Recipe.parse(self.recipe).terms]

    @property
    def papers(self) -> list[Paper]:
        """Papers of the published methods used, as the terms and the bridge declare them (see ``papers_used``)."""
        return papers_used([name for _, name in self.terms], self.bridge, self.scrg_corrections, self.lmbda)

    @property
    def methods(self) -> list[str]:
        """Short names of the published methods used."""
        return [paper.method for paper in self.papers]

    @property
    def library_name(self) -> str:
        """``peft`` for a LoRA adapter, ``transformers`` for full weights."""
        return "peft" if self.is_adapter else "transformers"

    def all_tags(self) -> list[str]:
        """Card tags: the library's, the methods', ``lora`` for adapters, then any extra tags."""
        tags = ["knowledge-distillation", "hf_kd", *(m.lower() for m in self.methods)]
        if self.is_adapter:
            tags.append("lora")
        tags.extend(self.tags)
        return list(dict.fromkeys(tags))

    def metadata(self) -> dict[str, Any]:
        """YAML front matter of the card (Hub model-card metadata)."""
        meta: dict[str, Any] = {}
        if looks_like_hub_id(self.student_base_model):
            meta["base_model"] = self.student_base_model
        meta["library_name"] = self.library_name
        if self.license:
            meta["license"] = self.license
        if self.language:
            meta["language"] = self.language
        if self.datasets:
            meta["datasets"] = list(self.datasets)
        meta["pipeline_tag"] = "text-generation"
        meta["tags"] = self.all_tags()
        return meta

    def results_rows(self) -> list[tuple[str, str, str, str, str]]:
        """(model, Rouge-L, KL, first-sentence EM %, repetition-loop %) rows of the results table; empty when no
        Rouge-L or KL was given."""
        rows = []
        for key, values in (self.eval_results or {}).items():
            if key not in RESULT_ROWS:
                logger.warning(f"Model card: evaluation entry {key!r} ignored; expected one of {sorted(RESULT_ROWS)}.")
                continue
            rouge, kl = _metric(values or {}, _ROUGE_KEYS), _metric(values or {}, _KL_KEYS)
            if rouge is not None or kl is not None:
                extra = [_fmt((values or {}).get(name)) for name in ("exact_match", "loop_rate")]
                rows.append((RESULT_ROWS[key], _fmt(rouge), _fmt(kl), *extra))
        if self.eval_results and not rows:
            logger.warning(
                "Model card: evaluation results were given but none has a Rouge-L ('rouge_l') or KL ('kl') value; "
                "the results table is left out."
            )
        order = list(RESULT_ROWS.values())
        return sorted(rows, key=lambda row: order.index(row[0]))


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def framework_versions() -> list[tuple[str, str]]:
    """Installed versions of hf_kd and the libraries it builds on, from their package metadata."""
    versions = []
    for dist in ("hf_kd", "transformers", "trl", "peft", "torch"):
        try:
            versions.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            versions.append((dist, "not installed"))
    return versions


# ---------------------------------------------------------------- rendering


def template_dirs() -> list[Path]:
    """Where the card template is looked for, in order: the installed package's ``hf_kd/model_cards/``, then the
    source checkout's top-level ``model_cards/``."""
    package_dir = Path(__file__).resolve().parent
    return [package_dir / TEMPLATE_FOLDER, package_dir.parent / TEMPLATE_FOLDER]


def find_template(name: str = TEMPLATE_NAME) -> Path:
    """Path of the card template ``name``."""
    for folder in template_dirs():
        if (folder / name).is_file():
            return folder / name
    searched = ", ".join(str(folder) for folder in template_dirs())
    raise FileNotFoundError(
        f"Model card template {name!r} not found in {searched}. Reinstall hf_kd (its wheel ships "
        "hf_kd/model_cards/) or pass `template=` explicitly."
    )


def render_model_card(data: ModelCardData, template: str | Path | None = None) -> str:
    """Render the README.md of a distilled student."""
    path = Path(template) if template is not None else find_template()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path.parent),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["fmt"] = _fmt
    env.filters["is_hub_id"] = looks_like_hub_id

    def link(name: str | None) -> str | None:
        return f"https://huggingface.co/{name}" if looks_like_hub_id(name) else None

    title = data.model_name or (data.repo_id.split("/")[-1] if data.repo_id else "Distilled student")
    return env.get_template(path.name).render(
        front_matter=yaml.safe_dump(data.metadata(), sort_keys=False, allow_unicode=True),
        title=title,
        repo_id=data.repo_id or title,
        student=data.student_base_model,
        student_link=link(data.student_base_model),
        teacher=data.teacher_model,
        teacher_link=link(data.teacher_model),
        is_adapter=data.is_adapter,
        merged_adapter=data.merged_adapter,
        methods=data.methods,
        recipe=data.recipe,
        terms=data.terms,
        bridge=data.bridge,
        scrg=data.scrg_corrections,
        lmbda=data.lmbda,
        beta=data.beta,
        kd_temperature=data.kd_temperature,
        sampling_temperature=data.sampling_temperature,
        datasets=data.datasets,
        budget_rows=data.budget.rows(),
        results_rows=data.results_rows(),
        figures=data.figures,
        helpers_included=data.helpers_included,
        versions=framework_versions(),
        citations=[(paper.citation_line, paper.bibtex) for paper in data.papers],
    )


def write_model_card(output_dir: str | Path, data: ModelCardData, template: str | Path | None = None) -> Path:
    """Render the card and write it as ``output_dir/README.md``; returns its path."""
    path = Path(output_dir) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, render_model_card(data, template))
    return path


def is_peft_model(model: Any) -> bool:
    """True for a PEFT (e.g. LoRA) wrapper around a base model."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def origin_of(model: Any) -> str | None:
    """Where a student (or the base of an adapter) was loaded from."""
    if model is None:
        return None
    if is_peft_model(model):
        config = model.peft_config.get(model.active_adapter)
        origin = getattr(config, "base_model_name_or_path", None)
        if origin:
            return origin
        model = model.get_base_model()
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def card_data_from_trainer(
    trainer: Any,
    model_name: str | None = None,
    dataset_name: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    *,
    merged: bool = False,
    license: str | None = None,
    language: str | list[str] | None = None,
    finetuned_from: str | None = None,
    helpers_included: bool = False,
) -> ModelCardData:
    """Collect a card's contents from a Trainer, its args and its state.

    Reads the optional trainer attributes ``teacher_model`` (or the ``teacher_source``'s ``teacher_name`` when no
    teacher model ran, as from a teacher cache), ``eval_results`` and ``card_figures`` (PNG files beside the card)
    and the args fields ``kd_loss``, ``bridge``, ``scrg_corrections``, ``lmbda``, ``beta``, ``kd_temperature`` and
    ``temperature`` when they exist.
    """
    args, state = trainer.args, trainer.state
    student = trainer.accelerator.unwrap_model(trainer.model)
    teacher = getattr(trainer, "teacher_model", None)
    if teacher is not None and not isinstance(teacher, str):
        teacher = origin_of(trainer.accelerator.unwrap_model(teacher))
    elif teacher is None and getattr(trainer, "teacher_source", None) is not None:  # e.g. an offline teacher cache
        teacher = trainer.teacher_source.teacher_name
    origin = finetuned_from or origin_of(student)
    datasets = dataset_name if dataset_name is not None else getattr(args, "dataset_name", None)
    train_dataset = getattr(trainer, "train_dataset", None)
    budget = TrainingBudget(
        steps=state.global_step,
        max_steps=args.max_steps if args.max_steps > 0 else None,
        epochs=state.epoch if state.epoch else (None if args.max_steps > 0 else args.num_train_epochs),
        per_device_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=args.world_size,
        learning_rate=args.learning_rate,
        tokens_seen=int(getattr(state, "num_input_tokens_seen", 0) or 0) or None,
        num_examples=len(train_dataset) if hasattr(train_dataset, "__len__") else None,
    )
    return ModelCardData(
        student_base_model=origin,
        teacher_model=teacher,
        recipe=getattr(args, "kd_loss", None) or "jsd",
        bridge=getattr(args, "bridge", None),
        scrg_corrections=int(getattr(args, "scrg_corrections", 0) or 0),
        lmbda=getattr(args, "lmbda", None),
        beta=getattr(args, "beta", None),
        kd_temperature=getattr(args, "kd_temperature", None),
        sampling_temperature=getattr(args, "temperature", None),
        datasets=[datasets] if isinstance(datasets, str) else list(datasets or []),
        budget=budget,
        eval_results=getattr(trainer, "eval_results", None),
        is_adapter=is_peft_model(student) and not merged,
        merged_adapter=is_peft_model(student) and merged,
        license=license or origin_license(origin),
        language=language,
        model_name=model_name,
        repo_id=trainer.hub_model_id or args.hub_model_id or Path(args.output_dir).absolute().name,
        tags=[tags] if isinstance(tags, str) else list(tags or []),
        helpers_included=helpers_included,
        figures=list(getattr(trainer, "card_figures", None) or []),
    )
