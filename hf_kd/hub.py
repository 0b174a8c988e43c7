"""Model cards and Hugging Face Hub uploads for distilled students.

``render_model_card`` fills the Jinja template ``student.md.j2`` from a ``ModelCardData``. The template is looked up
first in ``hf_kd/templates/`` (where a packaged build ships it) and then in the repository's ``model_cards/`` folder
(source checkouts and editable installs).

``DistillationHubMixin`` goes before the Trainer in a trainer's bases. It writes that card on every save and pushes the
full student, its LoRA adapter, or a merged copy of it; the trainable distillation helpers stay local unless asked for.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import jinja2
import yaml
from huggingface_hub import CommitOperationAdd, try_to_load_from_cache
from transformers import trainer as trainer_module
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .losses import parse_recipe

logger = logging.get_logger(__name__)

TEMPLATE_NAME = "student.md.j2"
CARD_NAME = "README.md"
HELPER_PATTERNS = ("hf_kd_modules*", "distillation_modules*")
"""Files (in ``output_dir``) that hold the trainable distillation helpers: DSKD projectors, the DAC-KL sub-network."""
HELPER_SUBFOLDER = "distillation_modules"
MERGED_SUBFOLDER = "merged"
TRAINER_IGNORE_PATTERNS = ("_*", f"{PREFIX_CHECKPOINT_DIR}-*")
"""What ``transformers.Trainer.push_to_hub`` leaves out of every upload."""

_T = TypeVar("_T")


# ---------------------------------------------------------------- recipe and methods


@dataclass(frozen=True)
class Paper:
    """A method's paper: title, arXiv id and BibTeX entry."""

    title: str
    arxiv_id: str
    bibtex: str


PAPERS: dict[str, Paper] = {
    "GKD": Paper(
        "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
        "2306.13649",
        """@inproceedings{agarwal2024onpolicy,
  title     = {On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes},
  author    = {Agarwal, Rishabh and Vieillard, Nino and Zhou, Yongchao and Stanczyk, Piotr and
               Ramos Garea, Sabela and Geist, Matthieu and Bachem, Olivier},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2306.13649},
  archivePrefix = {arXiv}
}""",
    ),
    "AKL": Paper(
        "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language Models",
        "2404.02657",
        """@article{wu2024rethinking,
  title   = {Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language Models},
  author  = {Wu, Taiqiang and Tao, Chaofan and Wang, Jiahao and Yang, Runming and Zhao, Zhe and Wong, Ngai},
  journal = {arXiv preprint arXiv:2404.02657},
  year    = {2024}
}""",
    ),
    "BiLD": Paper(
        "BiLD: Bi-directional Logits Difference Loss for Large Language Model Distillation",
        "2406.13555",
        """@inproceedings{li2025bild,
  title     = {{BiLD}: Bi-directional Logits Difference Loss for Large Language Model Distillation},
  author    = {Li, Minchong and Zhou, Feng and Song, Xiaohui},
  booktitle = {Proceedings of the 31st International Conference on Computational Linguistics (COLING)},
  year      = {2025},
  eprint    = {2406.13555},
  archivePrefix = {arXiv}
}""",
    ),
    "MGSR": Paper(
        "Multi-Granularity Semantic Revision for Large Language Model Distillation",
        "2407.10068",
        """@inproceedings{liu2026multi,
  title     = {Multi-Granularity Semantic Revision for Large Language Model Distillation},
  author    = {Liu, Xiaoyu and Zhang, Yun and Li, Wei and Huang, Xudong and
               Chen, Hanting and Tang, Yehui and Hu, Jie and Xiong, Zhiwei and Wang, Yunhe},
  booktitle = {Proceedings of the Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2026},
  eprint    = {2407.10068},
  archivePrefix = {arXiv}
}""",
    ),
    "DSKD": Paper(
        "Dual-Space Knowledge Distillation for Large Language Models",
        "2406.17328",
        """@article{zhang2024dskd,
  title   = {Dual-Space Knowledge Distillation for Large Language Models},
  author  = {Zhang, Songming and Zhang, Xue and Sun, Zengkui and Chen, Yufeng and Xu, Jinan},
  journal = {arXiv preprint arXiv:2406.17328},
  year    = {2024}
}""",
    ),
}

_METHOD_OF_TERM = {"akl": "AKL", "bild": "BiLD", "dac_kl": "MGSR", "span": "MGSR", "jsd": "GKD"}


def methods_used(
    term_names: Iterable[str], bridge: str | None = None, scrg_corrections: int = 0, lmbda: float | None = None
) -> list[str]:
    """Published methods a run used: from its loss terms, a DSKD bridge, SCRG (MGSR) and on-policy data (GKD)."""
    used = {_METHOD_OF_TERM[name] for name in term_names if name in _METHOD_OF_TERM}
    if bridge and bridge.lower().startswith("dskd"):
        used.add("DSKD")
    if scrg_corrections > 0:
        used.add("MGSR")
    if lmbda:
        used.add("GKD")
    return [name for name in PAPERS if name in used]


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

    @property
    def terms(self) -> list[tuple[float, str]]:
        """The recipe's (weight, name) terms, read by the loss library's parser."""
        return parse_recipe(self.recipe)

    @property
    def methods(self) -> list[str]:
        """Published methods used, in a fixed order (GKD, AKL, BiLD, MGSR, DSKD)."""
        return methods_used([name for _, name in self.terms], self.bridge, self.scrg_corrections, self.lmbda)

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

    def results_rows(self) -> list[tuple[str, str, str]]:
        """(model, Rouge-L, KL) rows of the results table; empty when no known metric was given."""
        rows = []
        for key, values in (self.eval_results or {}).items():
            if key not in RESULT_ROWS:
                logger.warning(f"Model card: evaluation entry {key!r} ignored; expected one of {sorted(RESULT_ROWS)}.")
                continue
            rouge, kl = _metric(values or {}, _ROUGE_KEYS), _metric(values or {}, _KL_KEYS)
            if rouge is not None or kl is not None:
                rows.append((RESULT_ROWS[key], _fmt(rouge), _fmt(kl)))
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
    """Installed versions of hf_kd and the libraries it builds on."""
    import hf_kd

    versions = [("hf_kd", hf_kd.__version__)]
    for dist in ("transformers", "trl", "peft", "torch"):
        try:
            versions.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            versions.append((dist, "not installed"))
    return versions


# ---------------------------------------------------------------- rendering


def template_dirs() -> list[Path]:
    """Where the card template is looked for, in order: the package's ``templates/``, the repo's ``model_cards/``."""
    package_dir = Path(__file__).resolve().parent
    return [package_dir / "templates", package_dir.parent / "model_cards"]


def find_template(name: str = TEMPLATE_NAME) -> Path:
    """Path of the card template ``name``."""
    for folder in template_dirs():
        if (folder / name).is_file():
            return folder / name
    searched = ", ".join(str(folder) for folder in template_dirs())
    raise FileNotFoundError(
        f"Model card template {name!r} not found in {searched}. Install hf_kd from a source checkout "
        "(`pip install -e .`) or from a build that ships hf_kd/templates/, or pass `template=` explicitly."
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
        helpers_included=data.helpers_included,
        versions=framework_versions(),
        citations=[
            (f"{name}: {PAPERS[name].title} (arXiv:{PAPERS[name].arxiv_id})", PAPERS[name].bibtex)
            for name in data.methods
        ],
    )


def write_model_card(output_dir: str | Path, data: ModelCardData, template: str | Path | None = None) -> Path:
    """Render the card and write it as ``output_dir/README.md``; returns its path."""
    path = Path(output_dir) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(data, template), encoding="utf-8")
    return path


HELPERS_README = """# Distillation modules

Trainable modules that hf_kd trained next to the student (DSKD projectors, the DAC-KL clipping sub-network).
They are not needed for inference: load the student from the repository root. They let a distillation run resume
with its helpers intact.

Files: {files}

```python
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file  # use torch.load(path, weights_only=True) for .pt files

state_dict = load_file(hf_hub_download("{repo_id}", "{subfolder}/{first}"))
# modules.load_state_dict(state_dict), where `modules` are built by the same hf_kd recipe
```
"""


def helper_files(output_dir: str | Path) -> list[tuple[Path, str]]:
    """(file, path relative to ``output_dir``) of every distillation-helper file (see ``HELPER_PATTERNS``)."""
    root = Path(output_dir)
    found = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in HELPER_PATTERNS):
            continue
        files = [entry] if entry.is_file() else sorted(p for p in entry.rglob("*") if p.is_file())
        found.extend((path, path.relative_to(root).as_posix()) for path in files)
    return found


# ---------------------------------------------------------------- trainer mixin


class HubPushError(RuntimeError):
    """A Hub call of ``push_to_hub`` failed; the local output is untouched."""


def _hub_api() -> Any:
    # The same shared HfApi that transformers.Trainer uses for create_repo and upload_folder.
    return trainer_module.hf_api()


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _origin_of(model: Any) -> str | None:
    """Where a student (or the base of an adapter) was loaded from."""
    if model is None:
        return None
    if _is_peft_model(model):
        config = model.peft_config.get(model.active_adapter)
        origin = getattr(config, "base_model_name_or_path", None)
        if origin:
            return origin
        model = model.get_base_model()
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


class DistillationHubMixin:
    """Model card on every save and Hub pushes (full model, LoRA adapter or merged copy) for a Trainer subclass.

    Use as ``class DistillationTrainer(DistillationHubMixin, GKDTrainer)``. Reads the optional attributes
    ``teacher_model`` and ``eval_results`` and the args fields ``kd_loss``, ``bridge``, ``scrg_corrections``,
    ``lmbda``, ``beta``, ``kd_temperature`` and ``temperature`` when they exist.
    """

    def _unwrap(self, model: Any) -> Any:
        accelerator = getattr(self, "accelerator", None)
        if model is None or accelerator is None or isinstance(model, str):
            return model
        return accelerator.unwrap_model(model)

    def _repo_id(self) -> str:
        return self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def model_card_data(
        self,
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
        """Collect the card's contents from the trainer, its args and its state."""
        args, state = self.args, self.state
        student = self._unwrap(self.model)
        teacher = self._unwrap(getattr(self, "teacher_model", None))
        origin = finetuned_from or _origin_of(student)
        datasets = dataset_name if dataset_name is not None else getattr(args, "dataset_name", None)
        train_dataset = getattr(self, "train_dataset", None)
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
            teacher_model=teacher if isinstance(teacher, str) else _origin_of(teacher),
            recipe=getattr(args, "kd_loss", None) or "jsd",
            bridge=getattr(args, "bridge", None),
            scrg_corrections=int(getattr(args, "scrg_corrections", 0) or 0),
            lmbda=getattr(args, "lmbda", None),
            beta=getattr(args, "beta", None),
            kd_temperature=getattr(args, "kd_temperature", None),
            sampling_temperature=getattr(args, "temperature", None),
            datasets=[datasets] if isinstance(datasets, str) else list(datasets or []),
            budget=budget,
            eval_results=getattr(self, "eval_results", None),
            is_adapter=_is_peft_model(student) and not merged,
            merged_adapter=_is_peft_model(student) and merged,
            license=license or origin_license(origin),
            language=language,
            model_name=model_name,
            repo_id=self._repo_id(),
            tags=[tags] if isinstance(tags, str) else list(tags or []),
            helpers_included=helpers_included,
        )

    _CARD_OPTIONS = ("dataset_name", "tags", "license", "language", "finetuned_from", "helpers_included")

    def _card_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Check the card keyword arguments; ``dataset`` (Trainer's name) is read as ``dataset_name``."""
        options = dict(options)
        dataset = options.pop("dataset", None)
        if options.get("dataset_name") is None and dataset is not None:
            options["dataset_name"] = dataset
        unknown = sorted(set(options) - set(self._CARD_OPTIONS))
        if unknown:
            raise TypeError(
                f"Unsupported model card arguments {unknown}; supported: {list(self._CARD_OPTIONS)} and 'dataset'."
            )
        return options

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the distillation model card to ``args.output_dir/README.md`` (main process only).

        Extra keyword arguments: ``license``, ``language``, ``finetuned_from``, ``helpers_included`` and ``dataset``
        (read as ``dataset_name``).
        """
        if not self.is_world_process_zero():
            return
        options = self._card_options({"dataset_name": dataset_name, "tags": tags, **kwargs})
        write_model_card(self.args.output_dir, self.model_card_data(model_name, **options))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as Trainer does, then write the model card next to the weights."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if not (self.args.should_save and self.is_world_process_zero()):
            return
        target = output_dir if output_dir is not None else self.args.output_dir
        try:
            write_model_card(target, self.model_card_data())
        except Exception as err:  # a card must never cost the saved weights
            logger.warning(f"The model card was not written to {target}: {type(err).__name__}: {err}")

    def save_merged_model(self, output_dir: str | Path | None = None, **card_kwargs: Any) -> Path:
        """Save the LoRA student merged into its base (a copy: the trained adapter is left as it is), with card."""
        student = self._unwrap(self.model)
        if not _is_peft_model(student):
            raise ValueError(
                "merge_adapter=True needs a LoRA (PEFT) student, but this student is a full model: "
                "push it with merge_adapter=False."
            )
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "merge_adapter=True is not supported when the student is sharded (FSDP/DeepSpeed): push the adapter, "
                "then merge it with AutoPeftModelForCausalLM.from_pretrained(repo).merge_and_unload()."
            )
        target = Path(output_dir) if output_dir is not None else Path(self.args.output_dir) / MERGED_SUBFOLDER
        if target.exists():
            shutil.rmtree(target)  # a stale merge could leave shards that no longer belong
        merged = copy.deepcopy(student).merge_and_unload()
        merged.save_pretrained(target)
        if getattr(self, "processing_class", None) is not None:
            self.processing_class.save_pretrained(target)
        del merged
        write_model_card(target, self.model_card_data(merged=True, **card_kwargs))
        return target

    def _hub_call(self, what: str, folder: str | Path, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except Exception as err:
            repo = self._repo_id()
            message = (
                f"Could not {what} on the Hugging Face Hub (repo '{repo}'): {type(err).__name__}: {err}. "
                f"Nothing was deleted: the saved student and its model card are still in '{folder}'. "
                "Check the network, the token (`hf auth login` or `hub_token`) and your write access to the repo, "
                f"then retry with `trainer.push_to_hub()` or `hf upload {repo} {folder}`."
            )
            logger.error(message)
            raise HubPushError(message) from err

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        merge_adapter: bool = False,
        include_helpers: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Upload the student with its card to ``args.hub_model_id``.

        A LoRA student is pushed as its adapter, or merged into its base with ``merge_adapter=True`` (a merged copy
        is saved to ``output_dir/merged`` and uploaded). Distillation helpers (``HELPER_PATTERNS``) stay local unless
        ``include_helpers=True``, which uploads them under ``distillation_modules/``. Hub calls go through the same
        ``hf_api()`` as ``Trainer.push_to_hub``, whose steps this follows (Trainer offers no way to add ignore
        patterns). A failed Hub call raises ``HubPushError`` and leaves every local file in place; with
        ``blocking=False`` the model upload runs in the background and its errors surface from the returned future.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        private = kwargs.pop("private", None)
        model_name = kwargs.pop("model_name", None)
        if model_name is None and self.args.should_save:
            model_name = (self.args.hub_model_id or Path(self.args.output_dir).name).split("/")[-1]
        token = token if token is not None else self.args.hub_token
        revision = revision if revision is not None else self.args.hub_revision
        output_dir = Path(self.args.output_dir)
        if merge_adapter and not _is_peft_model(self._unwrap(self.model)):
            raise ValueError(
                "merge_adapter=True needs a LoRA (PEFT) student, but this student is a full model: "
                "push it with merge_adapter=False."
            )

        options = self._card_options(kwargs)
        if self.hub_model_id is None:
            self._hub_call(
                "create the repository", output_dir, lambda: self.init_hf_repo(token=token, private=private)
            )
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None

        model_tags = getattr(self.model, "model_tags", None)
        if model_tags:
            tags = options.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            options["tags"] = tags + [tag for tag in model_tags if tag not in tags]
        options["helpers_included"] = include_helpers and bool(helper_files(output_dir))
        self.create_model_card(model_name=model_name, **options)
        folder = output_dir
        if merge_adapter:
            folder = self.save_merged_model(model_name=model_name, **options)

        self._finish_current_push()
        ignore_patterns = [*TRAINER_IGNORE_PATTERNS, *HELPER_PATTERNS, f"{MERGED_SUBFOLDER}/*"]
        result = self._hub_call(
            "upload the model folder",
            folder,
            lambda: _hub_api().upload_folder(
                repo_id=self.hub_model_id,
                folder_path=folder,
                commit_message=commit_message,
                token=token,
                run_as_future=not blocking,
                ignore_patterns=ignore_patterns,
                revision=revision,
            ),
        )
        if include_helpers:
            self._push_helpers(commit_message, token, revision)
        return result

    def _push_helpers(self, commit_message: str | None, token: str | None, revision: str | None) -> None:
        """Upload the helper files under ``distillation_modules/`` with a README, in one commit."""
        output_dir = Path(self.args.output_dir)
        files = helper_files(output_dir)
        if not files:
            logger.warning(
                f"include_helpers=True, but {output_dir} has no file matching {list(HELPER_PATTERNS)}: "
                "no distillation modules were uploaded."
            )
            return
        names = [relative for _, relative in files]
        readme = HELPERS_README.format(
            files=", ".join(f"`{name}`" for name in names),
            repo_id=self.hub_model_id,
            subfolder=HELPER_SUBFOLDER,
            first=names[0],
        )
        operations = [
            CommitOperationAdd(path_in_repo=f"{HELPER_SUBFOLDER}/{relative}", path_or_fileobj=str(path))
            for path, relative in files
        ]
        operations.append(
            CommitOperationAdd(path_in_repo=f"{HELPER_SUBFOLDER}/{CARD_NAME}", path_or_fileobj=readme.encode())
        )
        self._hub_call(
            "upload the distillation modules",
            output_dir,
            lambda: _hub_api().create_commit(
                repo_id=self.hub_model_id,
                operations=operations,
                commit_message=f"{commit_message or 'Upload'} (distillation modules)",
                token=token,
                revision=revision,
            ),
        )
