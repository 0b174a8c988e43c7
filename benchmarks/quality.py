"""Quality of the distillation methods side by side, on a real teacher, a real student and real data.

SmolLM2-135M-Instruct teaches a student made of 20 of its 30 decoder layers, those of highest block influence
(hf_kd.assets.student_layers), on the bundled conversations (hf_kd/data). Every method trains the same student
initialisation for the same steps, batch, learning-rate schedule and seeds; the off-policy rows that can train
from the offline teacher cache do (built once, the demo's cache), the others run the live teacher. Each student
is scored on held-out conversations with hf_kd.evaluation.evaluate_student: Rouge-L of greedy answers against the
references, first-sentence exact match, the share of answers caught in a repetition loop, and the token-level
KL(SmolLM2 teacher || student) on the references. The teacher and the untrained student are scored for scale.

Intervals: 95% bootstrap over held-out prompts and seeds (the same prompts for every row); each comparison of two
rows (the papers' claims) is a paired bootstrap of the difference, resampling prompts jointly.

Rows: SFT on the references, FKL (from the top-64 cache with a flat or a student-shaped tail, from a top-128 cache,
and from the live teacher: the cache's fidelity at equal budget), RKL, hf_kd's jsd and TRL's own GKDTrainer
(off-policy, the external baseline), GKD on-policy (jsd, lmbda 0.5), AKL, BiLD as its official trainer runs it (bild
+ prompt-position FKL), MGSR (ce+dac_kl+span with SCRG on student generations), DSKD with the same vocabulary, and
DSKD-CMA with Gemma-3-270m as the teacher (different vocabulary). Each run is a fresh subprocess with freshly loaded
models; its record (every answer and per-prompt score included) is appended to the JSON as soon as it finishes, so
the benchmark resumes across sessions; the markdown page and the plot are rewritten from the JSON.

Usage::

    python benchmarks/quality.py --budget cpu                         # every row, 3 seeds (hours on 2 CPU cores)
    python benchmarks/quality.py --budget cpu --methods fkl fkl-live  # a subset
    python benchmarks/quality.py --budget cpu --resume                # run only the (row, seed) pairs missing
    python benchmarks/quality.py --budget cpu --resume --max-runs 2   # ... two of them, in --methods order
    python benchmarks/quality.py --render benchmarks/results/quality_cpu-demo.json --commentary notes.md \
        --readme docs/results/methods.md

Results: ``benchmarks/results/quality_<budget>.json``, ``.md`` and ``.png``; ``--readme`` rewrites the methods section
of the docs page that README links to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402  (offline defaults, shared with speed_memory.py)
    environment,
    format_table,
    replace_readme_section,
    run_in_fresh_process,
    write_text_atomically,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


# ---------------------------------------------------------------------------------------------- what runs
@dataclass(frozen=True)
class Budget:
    """Training and evaluation sizes shared by every row of one table."""

    steps: int
    batch: int
    learning_rate: float
    max_length: int
    eval_samples: int | None
    """Held-out conversations scored, evenly spread over the held-out file (None = all)."""
    max_new_tokens: int
    """Greedy tokens per held-out answer, and the length of on-policy generations during training."""
    lmbda: float
    """Share of on-policy (student-generated) steps of the "shared" rows; SFT always 0."""
    mgsr_lmbda: float
    """MGSR's share of on-policy steps: SCRG corrects student generations, so it needs lmbda > 0."""
    seeds: int
    student_layers: int = 20
    eval_batch: int = 8
    onpolicy_lmbda: float = 0.5
    """The on-policy GKD row's share (the GKD paper's lmbda)."""
    layer_selection: str = "influence"
    """How the student's layers are chosen (hf_kd.assets.student_layers)."""
    cache_top_k: int | None = 64
    """Top-k of the offline teacher cache the cache rows train from; None: every row runs the live teacher."""
    drop_looping_answers: bool = False
    """Leave out the training conversations whose teacher answer loops (hf_kd.demo.without_looping_answers)."""
    train_sampling_strategy: str = "random"
    """transformers' sampler: "group_by_length" batches conversations of similar length (less padding)."""
    general_eval: bool = True
    """Also score every row on the general-assistant held-out set (bundled ``heldout_general``), eval_samples of it."""


# The cpu budget is the demo's former recipe at half its steps: the 20-layer block-influence student starts at a
# held-out KL of about 2 and writes fluent but wrong answers, so 40 steps at lr 5e-4 separate what the methods teach.
# Measured on 2 cores: about 4-5 s per cached step, 7 s per live-teacher step, more with generation.
CPU = Budget(
    steps=40,
    batch=4,
    learning_rate=5e-4,
    max_length=256,
    eval_samples=40,
    max_new_tokens=48,
    lmbda=0.0,
    mgsr_lmbda=0.25,
    seeds=3,
)
BUDGETS: dict[str, Budget] = {
    "cpu": CPU,
    # The demo's recipe (hf_kd.demo): 24 layers, lr 2e-4, batches of similar length, training answers that loop left
    # out, 80 steps; the demo's student loops in 10-15% of its held-out answers over 3 seeds (the teacher in 17.5%).
    "cpu-demo": dataclasses.replace(
        CPU,
        steps=80,
        learning_rate=2e-4,
        student_layers=24,
        drop_looping_answers=True,
        train_sampling_strategy="group_by_length",
    ),
    "gpu": Budget(
        steps=200,
        batch=8,
        learning_rate=1e-4,
        max_length=512,
        eval_samples=None,
        max_new_tokens=96,
        lmbda=0.0,
        mgsr_lmbda=0.5,
        seeds=3,
        eval_batch=32,
    ),
}


@dataclass(frozen=True)
class Method:
    """One row of the table: how the student is trained (or which model is only evaluated)."""

    recipe: str
    """What the row trains with, as shown in the table."""
    trainer: Literal["hf_kd", "trl"] | None = "hf_kd"
    """None: an evaluation-only row."""
    kd_loss: str | None = None
    teacher: str = SMOLLM2
    """Real-model name (hf_kd.assets) of the teacher that trains the student."""
    lmbda: Literal["none", "shared", "onpolicy", "mgsr"] = "shared"
    """Which Budget field sets the on-policy share ("none": 0)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Further DistillationConfig fields."""
    evaluates: Literal["student", "teacher"] = "student"
    teacher_cache: bool = False
    """Train from the offline teacher cache (when the budget has one) instead of the live teacher."""
    cache_top_k: int | None = None
    """The cache's k for this row (None: the budget's ``cache_top_k``)."""


METHODS: dict[str, Method] = {
    "teacher": Method("SmolLM2-135M-Instruct, 30 layers (evaluated only)", trainer=None, evaluates="teacher"),
    "student-init": Method("layer-pruned student before training (evaluated only)", trainer=None),
    "sft": Method("kd_loss=ce (SFT on the references)", kd_loss="ce", lmbda="none", teacher_cache=True),
    "fkl": Method(
        "kd_loss=fkl, teacher cache, flat tail",
        kd_loss="fkl",
        teacher_cache=True,
        config={"teacher_cache_tail": "flat"},
    ),
    "fkl-live": Method("kd_loss=fkl, live teacher", kd_loss="fkl"),
    "fkl-tail": Method(
        "kd_loss=fkl, teacher cache, student-shaped tail (top-k + tail bucket; the default)",
        kd_loss="fkl",
        teacher_cache=True,
        config={"teacher_cache_tail": "student"},
    ),
    "fkl-tail-k128": Method(
        "kd_loss=fkl, teacher cache of top-128, student-shaped tail",
        kd_loss="fkl",
        teacher_cache=True,
        cache_top_k=128,
        config={"teacher_cache_tail": "student"},
    ),
    "rkl": Method("kd_loss=rkl, teacher cache", kd_loss="rkl", teacher_cache=True),
    "jsd": Method("kd_loss=jsd, beta 0.5, teacher cache", kd_loss="jsd", teacher_cache=True),
    "jsd-live": Method("kd_loss=jsd, beta 0.5, live teacher", kd_loss="jsd"),
    "trl-gkd": Method("TRL GKDTrainer, beta 0.5", trainer="trl"),
    "gkd-onpolicy": Method("kd_loss=jsd, beta 0.5, on-policy (GKD)", kd_loss="jsd", lmbda="onpolicy"),
    "akl": Method("kd_loss=akl, mu 0.5, teacher cache", kd_loss="akl", teacher_cache=True),
    "bild": Method("kd_loss=bild+prompt_fkl, top-k 8, T 3 (official trainer)", kd_loss="bild+prompt_fkl"),
    "mgsr": Method(
        "kd_loss=ce+dac_kl+span, scrg_corrections=1",
        kd_loss="ce+dac_kl+span",
        lmbda="mgsr",
        config={"scrg_corrections": 1},
    ),
    "dskd": Method("bridge=dskd, kd_loss=fkl, kd_rate 0.5, T 2", kd_loss="fkl", config={"bridge": "dskd"}),
    "teacher-gemma": Method(
        "Gemma-3-270m base, plain chat format (evaluated only)", trainer=None, teacher=GEMMA, evaluates="teacher"
    ),
    "dskd-cma": Method(
        "Gemma-3-270m teacher, bridge=dskd (CMA), kd_loss=fkl, kd_rate 0.5, T 2",
        kd_loss="fkl",
        teacher=GEMMA,
        config={"bridge": "dskd"},
    ),
}


@dataclass
class RunSpec:
    """One row and seed, run in one process (JSON-serialisable so the parent can hand it to a child)."""

    method: str
    seed: int
    budget: Budget
    output_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="kd_quality_"))
    threads: int | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Last-word trainer config fields (tests shrink helper modules with it)."""
    cache_dir: str | None = None
    """Where the teacher cache is built (None: the bundled data's shared cache under hf_kd's cache directory)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**{**data, "budget": Budget(**data["budget"])})

    def lmbda(self) -> float:
        """The on-policy share this row trains with."""
        source = METHODS[self.method].lmbda
        shares = {"none": 0.0, "shared": self.budget.lmbda, "onpolicy": self.budget.onpolicy_lmbda}
        return (shares | {"mgsr": self.budget.mgsr_lmbda})[source]

    def uses_cache(self) -> bool:
        """Whether this row trains from the offline teacher cache."""
        return METHODS[self.method].teacher_cache and self.budget.cache_top_k is not None

    def cache_top_k(self) -> int | None:
        """The k of the cache this row trains from (None: the live teacher)."""
        return (METHODS[self.method].cache_top_k or self.budget.cache_top_k) if self.uses_cache() else None


@dataclass
class Pair:
    """The models of one run. ``kl_teacher`` shares the student's tokenizer and is the KL reference of every row;
    ``teacher`` trains the student (it is ``kl_teacher`` itself unless the vocabularies differ)."""

    student: Any
    tokenizer: Any
    teacher: Any
    kl_teacher: Any
    teacher_tokenizer: Any | None = None
    """Set when the teacher's vocabulary differs from the student's."""


# ---------------------------------------------------------------------------------------------- one run
def load_real_pair(spec: RunSpec, train_dataset) -> Pair:
    """Fresh real models for ``spec``: SmolLM2 (KL reference and, same-vocabulary, teacher), its layer-pruned
    student (layers chosen on ``train_dataset``), and Gemma-3-270m with its tokenizer when the row's teacher is
    Gemma."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.assets import load_real_model, prune_layers, student_layers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    smollm = load_real_model(SMOLLM2)
    kl_teacher = AutoModelForCausalLM.from_pretrained(smollm, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(smollm)
    budget = spec.budget
    keep = student_layers(kl_teacher, tokenizer, train_dataset, budget.student_layers, budget.layer_selection)
    student = prune_layers(kl_teacher, keep).to(device)
    method = METHODS[spec.method]
    if method.teacher == SMOLLM2:
        return Pair(student, tokenizer, kl_teacher, kl_teacher)
    path = load_real_model(method.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return Pair(student, tokenizer, teacher, kl_teacher, AutoTokenizer.from_pretrained(path))


def build_trainer(spec: RunSpec, pair: Pair, train_dataset) -> Any:
    """TRL's GKDTrainer or hf_kd's DistillationTrainer for the row, with the settings every row shares."""
    import torch

    method = METHODS[spec.method]
    budget = spec.budget
    cuda = torch.cuda.is_available()
    shared = {
        "output_dir": spec.output_dir,
        "max_steps": budget.steps,
        "per_device_train_batch_size": budget.batch,
        "learning_rate": budget.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, budget.steps // 10),
        "max_length": budget.max_length,
        "max_new_tokens": budget.max_new_tokens,
        "lmbda": spec.lmbda(),
        "beta": 0.5,
        "seq_kd": False,
        "bf16": cuda,
        "use_cpu": not cuda,
        "gradient_checkpointing": False,
        "logging_steps": max(1, budget.steps // 10),
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": spec.seed,
        "train_sampling_strategy": budget.train_sampling_strategy,
    }
    common = {
        "model": pair.student,
        "teacher_model": pair.teacher,
        "train_dataset": train_dataset,
        "processing_class": pair.tokenizer,
    }
    if spec.uses_cache():
        common |= {"teacher_model": None, "train_dataset": teacher_cache_dataset(spec, pair, train_dataset)}
    if method.trainer == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        from hf_kd.data import with_token_lengths  # GKDTrainer's sampler cannot count a chat dataset's tokens

        common["train_dataset"] = with_token_lengths(common["train_dataset"], pair.tokenizer)
        return GKDTrainer(args=GKDConfig(**shared | spec.config_overrides), **common)
    from hf_kd import DistillationConfig, DistillationTrainer

    args = DistillationConfig(**shared | {"kd_loss": method.kd_loss} | method.config | spec.config_overrides)
    return DistillationTrainer(args=args, teacher_processing_class=pair.teacher_tokenizer, **common)


def teacher_cache_dataset(spec: RunSpec, pair: Pair, train_dataset):
    """The teacher's top-k cache of ``train_dataset`` (built on first use, then reused), loaded for training."""
    from hf_kd import cache_teacher, load_teacher_cache
    from hf_kd.demo import BUNDLED_DATA, DROPPED_LOOPS_DATA, bundled_teacher_cache

    k, max_length = spec.cache_top_k(), spec.budget.max_length
    if spec.cache_dir is None:
        data_name = DROPPED_LOOPS_DATA if spec.budget.drop_looping_answers else BUNDLED_DATA
        folder = bundled_teacher_cache(pair.teacher, pair.tokenizer, train_dataset, SMOLLM2, k, max_length, data_name)
    else:
        folder = cache_teacher(
            pair.teacher, pair.tokenizer, train_dataset, spec.cache_dir, top_k=k, max_length=max_length
        )
    return load_teacher_cache(folder, teacher=pair.teacher, top_k=k)


def _last_logged_terms(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The per-term losses and SCRG statistics of the last logging step."""
    for entry in reversed(log_history):
        terms = {k: float(v) for k, v in entry.items() if k.startswith(("loss/", "scrg/"))}
        if terms:
            return terms
    return {}


def heldout_subset(heldout, count: int | None):
    """``count`` held-out rows evenly spread over the file (its sources come in blocks), or all of them."""
    from hf_kd.assets import evenly_spaced_layers

    if count is None or count >= len(heldout):
        return heldout
    return heldout.select(evenly_spaced_layers(count, len(heldout)))


def score_heldout(model, tokenizer, kl_teacher, heldout, budget: Budget) -> dict[str, Any]:
    """evaluate_student on ``budget.eval_samples`` rows of ``heldout``, with every answer, per-prompt scores and the
    time it took."""
    from hf_kd.evaluation import evaluate_student

    scored = heldout_subset(heldout, budget.eval_samples)
    started, cpu_started = time.perf_counter(), time.process_time()
    scores = evaluate_student(
        model,
        tokenizer,
        scored,
        teacher=kl_teacher,
        max_new_tokens=budget.max_new_tokens,
        batch_size=budget.eval_batch,
        return_predictions=True,
        per_sample=True,
    )
    scores["eval_s"] = time.perf_counter() - started
    scores["eval_cpu_s"] = time.process_time() - cpu_started
    scores["empty_answers_pct"] = 100.0 * sum(not p.strip() for p in scores["predictions"]) / len(scored)
    return scores


def run_method(spec: RunSpec, pair: Pair, train_dataset, heldout, general=None) -> dict[str, Any]:
    """Trains (unless the row is evaluation-only) and scores one row on ``heldout`` (its top-level scores) and on
    ``general`` when given (under ``"heldout_general"``); returns its record."""
    import torch
    from transformers import set_seed

    if spec.threads:
        torch.set_num_threads(spec.threads)
    method = METHODS[spec.method]
    budget = spec.budget
    set_seed(spec.seed)
    record: dict[str, Any] = {
        "method": spec.method,
        "seed": spec.seed,
        "lmbda": spec.lmbda(),
        "teacher_cache": spec.uses_cache(),
        "cache_top_k": spec.cache_top_k(),
    }
    model, tokenizer, kl_teacher = pair.student, pair.tokenizer, pair.kl_teacher
    if method.evaluates == "teacher":
        model, tokenizer = pair.teacher, pair.teacher_tokenizer or pair.tokenizer
        kl_teacher = None  # KL to itself is 0; a different vocabulary has no token-level KL
    if method.trainer is not None:
        trainer = build_trainer(spec, pair, train_dataset)
        started, cpu_started = time.perf_counter(), time.process_time()
        output = trainer.train()
        record["train_s"] = time.perf_counter() - started
        record["train_cpu_s"] = time.process_time() - cpu_started
        record["train_loss"] = float(output.training_loss)
        record["global_step"] = trainer.state.global_step
        record["last_logged"] = _last_logged_terms(trainer.state.log_history)
        model = trainer.accelerator.unwrap_model(trainer.model)
    record |= score_heldout(model, tokenizer, kl_teacher, heldout, budget)
    if general is not None:
        record["heldout_general"] = score_heldout(model, tokenizer, kl_teacher, general, budget)
    return record


def run_child(spec: RunSpec) -> dict[str, Any]:
    """One row on the real models and the bundled data (the body of a child process)."""
    from hf_kd.data import load_bundled_dataset
    from hf_kd.demo import without_looping_answers

    started = time.perf_counter()
    train, heldout = load_bundled_dataset("train"), load_bundled_dataset("heldout")
    general = load_bundled_dataset("heldout_general") if spec.budget.general_eval else None
    if spec.budget.drop_looping_answers:
        train = without_looping_answers(train)
    pair = load_real_pair(spec, train)
    load_s = time.perf_counter() - started
    record = run_method(spec, pair, train, heldout, general)
    record["load_s"] = load_s
    record["train_examples"] = len(train)
    return record


def run_in_subprocess(spec: RunSpec, timeout: float) -> dict[str, Any]:
    """Runs ``spec`` in a fresh Python process; a failure becomes a record with an ``error``."""
    started = time.perf_counter()
    record = run_in_fresh_process(Path(__file__).resolve(), spec, spec.threads, timeout)
    if "error" in record:
        return {"method": spec.method, "seed": spec.seed, **record}
    return record | {"wall_s": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------- the table
RESAMPLES = 2000
FINDINGS_HEADING = "Findings (commentary on this run, written after it)"  # the results page's and docs page's
# The papers' claims, as (claim, row, baseline row): the row should score above the baseline.
CLAIMS = [
    ("AKL over FKL (AKL paper)", "akl", "fkl-tail"),
    ("AKL over RKL (AKL paper)", "akl", "rkl"),
    ("BiLD over KL (BiLD paper)", "bild", "fkl-live"),
    ("MGSR over on-policy GKD (MGSR paper)", "mgsr", "gkd-onpolicy"),
    ("DSKD over plain KD, same vocabulary (DSKD paper)", "dskd", "fkl-live"),
    ("DSKD-CMA over SFT across vocabularies (DSKD paper)", "dskd-cma", "sft"),
    ("on-policy GKD over off-policy GKD (GKD paper; off-policy from the cache)", "gkd-onpolicy", "jsd"),
    ("hf_kd jsd vs TRL GKDTrainer, same objective, both live (should agree)", "jsd-live", "trl-gkd"),
    ("teacher cache vs live teacher, jsd (should agree)", "jsd", "jsd-live"),
    ("teacher cache, flat tail vs live teacher, fkl (should agree)", "fkl", "fkl-live"),
    ("cache with a tail bucket vs live teacher, fkl (should agree)", "fkl-tail", "fkl-live"),
    ("top-128 cache with a tail bucket vs live teacher, fkl (should agree)", "fkl-tail-k128", "fkl-live"),
]


def _finished(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in results if r["method"] == name and "error" not in r and "per_sample" in r]


def _statistic(records: list[dict[str, Any]], metric: str, seeds: list[int], prompts: list[int]) -> float:
    """Mean over the chosen seeds of the metric over the chosen prompts (KL: token-weighted, as evaluated)."""
    values = []
    for s in seeds:
        sample = records[s]["per_sample"]
        if metric == "kl":
            tokens = sum(sample["kl_tokens"][i] for i in prompts)
            values.append(sum(sample["kl_sum"][i] for i in prompts) / max(tokens, 1))
        else:
            values.append(sum(sample[metric][i] for i in prompts) / len(prompts))
    return sum(values) / len(values)


def bootstrap(rows: list[list[dict[str, Any]]], metric: str, sign: tuple[int, ...] = (1,), seed: int = 0):
    """(point estimate, 2.5th, 97.5th percentile) of sum_j sign[j] * statistic(rows[j]); every resample draws the
    held-out prompts once for all rows (paired) and each row's seeds independently."""
    import random

    key = "kl_sum" if metric == "kl" else metric
    if any(not records or key not in records[0]["per_sample"] for records in rows):
        return None
    rng = random.Random(seed)
    n_prompts = len(rows[0][0]["per_sample"]["rouge_l"])
    everything = list(range(n_prompts))
    point = sum(k * _statistic(r, metric, list(range(len(r))), everything) for k, r in zip(sign, rows))
    draws = []
    for _ in range(RESAMPLES):
        prompts = [rng.randrange(n_prompts) for _ in everything]
        draws.append(
            sum(k * _statistic(r, metric, [rng.randrange(len(r)) for _ in r], prompts) for k, r in zip(sign, rows))
        )
    draws.sort()
    return point, draws[int(0.025 * RESAMPLES)], draws[int(0.975 * RESAMPLES) - 1]


def _interval(values, spec: str) -> str:
    if values is None:
        return "-"
    point, low, high = values
    return f"{format(point, spec)} [{format(low, spec)}, {format(high, spec)}]"


def _mean(records: list[dict[str, Any]], key: str, spec: str) -> str:
    values = [r[key] for r in records if key in r]
    return format(statistics.mean(values), spec) if values else "-"


def row_intervals(results: list[dict[str, Any]], order: list[str]) -> dict[str, dict[str, tuple | None]]:
    """{row: {"rouge_l": interval, "kl": interval}} for every finished row in ``order`` (bootstrap over prompts and
    seeds), computed once for the table and the plot."""
    intervals = {}
    for name in order:
        ok = _finished(results, name)
        if ok:
            intervals[name] = {metric: bootstrap([ok], metric) for metric in ("rouge_l", "kl")}
    return intervals


def markdown_table(results: list[dict[str, Any]], order: list[str], intervals: dict[str, dict]) -> str:
    """One row per method: point estimates with their 95% bootstrap ``intervals`` (:func:`row_intervals`)."""
    head = ["method", "recipe", "teacher", "lmbda", "seeds", "Rouge-L [95% CI]", "KL(teacher‖student) [95% CI]"]
    head += ["first-sentence EM %", "loops %", "answer words", "answers < 10 words %", "train s / run"]
    rows = []
    for name in order:
        records = [r for r in results if r["method"] == name]
        if not records:
            continue
        ok = _finished(results, name)
        method = METHODS.get(name)
        cells = [name, method.recipe if method else "?"]
        if not ok:
            cells += [f"error: {records[-1].get('error', 'no per-prompt scores')}"] + ["-"] * (len(head) - 3)
        else:
            trained = method is None or method.trainer is not None
            source = "cache" if ok[0].get("teacher_cache") else ("live" if trained else "-")
            cells += [
                source,
                f"{ok[0]['lmbda']:g}" if trained else "-",
                str(len(ok)),
                _interval(intervals[name]["rouge_l"], ".2f"),
                _interval(intervals[name]["kl"], ".3f"),
                _mean(ok, "exact_match", ".1f"),
                _mean(ok, "loop_rate", ".1f"),
                _mean(ok, "answer_words" if "answer_words" in ok[0] else "mean_answer_words", ".1f"),  # older JSON
                _mean(ok, "short_answer_rate", ".1f"),
                _mean(ok, "train_s", ".0f"),
            ]
        rows.append(cells)
    return format_table(head, rows)


# Differences whose whole interval lies within these margins count as ties: a fifth of the spread between the live
# fkl row's seeds (KL 0.790-0.813), and half a Rouge-L point. Two exact implementations of one objective can
# differ by less (the 4th decimal of a loss) and still be "significantly" different over 40 identical answers.
EQUAL_KL = 0.005
EQUAL_ROUGE_L = 0.5


def claims_table(results: list[dict[str, Any]]) -> str:
    """Each claim as the paired-bootstrap difference (row - baseline) of Rouge-L and of KL, and what it says: a
    difference counts when its 95% interval excludes 0 and reaches past the margins above."""
    lines = [
        "| claim | rows | Rouge-L difference [95% CI] | KL difference [95% CI] | here |",
        "|---|---|---|---|---|",
    ]
    for claim, row, baseline in CLAIMS:
        a, b = _finished(results, row), _finished(results, baseline)
        if not a or not b:
            continue
        rouge = bootstrap([a, b], "rouge_l", sign=(1, -1))
        kl = bootstrap([a, b], "kl", sign=(1, -1))
        agree = "should agree" in claim
        verdicts = []
        for diff, better, margin in ((rouge, 1, EQUAL_ROUGE_L), (kl, -1, EQUAL_KL)):  # higher Rouge-L, lower KL
            if diff is None:
                continue
            _, low, high = diff
            if (low > 0 or high < 0) and not (-margin <= low and high <= margin):
                verdicts.append("better" if (low > 0) == (better > 0) else "worse")
            else:
                verdicts.append("tie")
        if agree:
            verdict = "agree" if set(verdicts) == {"tie"} else "differ"
        elif "worse" not in verdicts and "better" in verdicts:
            verdict = "reproduces"
        elif "better" not in verdicts and "worse" in verdicts:
            verdict = "reversed"
        else:
            verdict = "cannot tell" if set(verdicts) == {"tie"} else "mixed"
        seeds = f"{len(a)} vs {len(b)} seeds"
        lines.append(
            f"| {claim} | {row} - {baseline} ({seeds}) | {_interval(rouge, '+.2f')} | {_interval(kl, '+.3f')} | "
            f"{verdict} |"
        )
    return "\n".join(lines) + "\n"


def plot_methods(intervals: dict[str, dict], path: Path) -> Path | None:
    """Rouge-L and KL per row with their 95% ``intervals`` (:func:`row_intervals`), one panel each (PNG); None when
    nothing finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(intervals)
    if not names:
        return None
    fig, panels = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5), sharey=True)
    for panel, metric, label in zip(panels, ("rouge_l", "kl"), ("Rouge-L (higher is better)", "KL(teacher‖student)")):
        ys, points, errors = [], [], [[], []]
        for y, name in enumerate(names):
            values = intervals[name][metric]
            if values is None:
                continue
            point, low, high = values
            ys.append(y)
            points.append(point)
            errors[0].append(point - low)
            errors[1].append(high - point)
        panel.errorbar(points, ys, xerr=errors, fmt="o", capsize=3)
        panel.set_xlabel(label + ", 95% bootstrap CI")
        panel.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(range(len(names)), names)
    panels[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def on_general_set(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records scored on the general-assistant held-out set, with those scores in place of the first set's (so
    the table and claims code reads them); failed runs are kept."""
    return [
        r | r["heldout_general"] if "heldout_general" in r else r
        for r in results
        if "heldout_general" in r or "error" in r
    ]


def render_markdown(payload: dict[str, Any], intervals: dict[str, dict], figure: str | None = None) -> str:
    """The whole results page: command, budget, machine, conditions, the tables and any commentary."""
    budget = payload["budget"]
    env = payload["environment"]
    results = payload["results"]
    done = [r for r in results if "error" not in r]
    eval_n = next((r["num_samples"] for r in done), None)
    cpu_s = sum(r.get("train_cpu_s", 0.0) + r.get("eval_cpu_s", 0.0) for r in done)
    train_n = next((r["train_examples"] for r in done if "train_examples" in r), None)
    machine = (
        f"{env.get('gpu') or env['cpu']}, {env['cpu_count']} CPU cores, {payload['threads'] or 'default'} threads; "
        f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}"
    )
    cache = budget.get("cache_top_k")
    lines = [
        f"# Distillation quality, `{payload['budget_name']}` budget",
        "",
        "Generated by `benchmarks/quality.py` from `" + payload["json_name"] + "`; every number is measured.",
        "",
        "- Command: " + "; ".join(f"`{c}`" for c in payload["commands"]),
        f"- Machine: {machine}",
        f"- Budget: {budget['steps']} steps, batch {budget['batch']}, learning rate {budget['learning_rate']:g} "
        f"(cosine, {max(1, budget['steps'] // 10)} warm-up steps), max_length {budget['max_length']}, "
        f"{budget['max_new_tokens']} new tokens (evaluation and on-policy generation), seeds "
        f"{sorted({r['seed'] for r in done}) or '-'} of {budget['seeds']} planned; identical for every row.",
        f"- On-policy share: lmbda = {budget['lmbda']:g} for the distillation rows, "
        f"{budget.get('onpolicy_lmbda', 0.5):g} for on-policy GKD, {budget['mgsr_lmbda']:g} for MGSR (SCRG corrects "
        "student generations), 0 for SFT.",
        f"- Teacher: rows marked `cache` train from the offline top-{cache} teacher cache of the training data "
        "(no teacher forward per step; built once), `live` rows run the teacher at every step."
        if cache
        else "- Teacher: every row runs the live teacher.",
        f"- Pair: SmolLM2-135M-Instruct teacher, student = {budget['student_layers']} of its 30 decoder layers "
        f"({budget.get('layer_selection', 'even')} selection, embeddings and head copied); dskd-cma trains the "
        "same student from Gemma-3-270m (vocabulary 262144 vs 49152).",
        f"- Data: {train_n if train_n is not None else '?'} bundled training conversations; "
        f"{eval_n if eval_n is not None else '?'} held-out conversations, evenly spread over the held-out file "
        "(all its sources), are scored. The references are greedy answers of the SmolLM2 teacher (at most 96 "
        "tokens), so its own row is near the ceiling but below 100 (shorter generation budget, trimmed references).",
        "- Metrics: Rouge-L F1 x 100 of greedy answers vs references; KL(SmolLM2 teacher ‖ student) per reference "
        "answer token in nats (the SmolLM2 teacher for every row, dskd-cma's student included; teacher rows: not "
        "applicable); first-sentence exact match; loops: answers caught in a repetition loop "
        "(`hf_kd.evaluation.has_repetition_loop`); answer words: mean words per greedy answer. Point estimates "
        f"are means over seeds; intervals are 95% percentile bootstraps ({RESAMPLES} resamples) over held-out "
        "prompts and seeds. Each record in the JSON keeps every greedy answer and per-prompt score.",
        f"- Time: {payload.get('wall_s', 0) / 60:.1f} min of wall time for the runs in this file (subprocesses, "
        f"model loading and evaluation included); training and evaluation used {cpu_s / 60:.1f} min of process CPU "
        "time. `train s / run` is training alone, mean over seeds. The cores were shared with other work, so wall "
        "times are indicative; the quality numbers do not depend on it.",
        "",
        markdown_table(results, payload["methods"], intervals),
    ]
    if figure:
        lines += [f"![Rouge-L and KL per method, 95% intervals]({figure})", ""]
    claims = claims_table(results)
    if claims.count("\n") > 2:
        lines += [
            "## The papers' claims here",
            "",
            "Paired bootstrap of the difference (row - baseline) over the same prompts; `reproduces`: better on at "
            "least one metric with an interval that excludes 0 and worse on none; `cannot tell`: both intervals "
            f"contain 0 (this budget cannot separate the two rows); an interval inside ±{EQUAL_ROUGE_L} Rouge-L or "
            f"±{EQUAL_KL} nats counts as 0.",
            "",
            claims,
        ]
    general = on_general_set(results)
    if any("error" not in r for r in general):
        general_n = next(r["num_samples"] for r in general if "error" not in r)
        lines += [
            "## General-assistant held-out set",
            "",
            f"The same students on {general_n} prompts of `heldout_general` (everyday questions from sources the "
            "training data never draws from: short facts, explanations, lists, rewriting, simple maths, code, "
            "creative writing), evenly spread over the file; the same metrics and claims.",
            "",
            markdown_table(general, payload["methods"], row_intervals(general, payload["methods"])),
            "",
        ]
        general_claims = claims_table(general)
        lines += [general_claims, ""] if general_claims.count("\n") > 2 else []
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["Failed runs:", ""] + [f"- {r['method']} seed {r['seed']}: {r['error']}" for r in failed] + [""]
    if payload.get("commentary"):
        lines += [f"## {FINDINGS_HEADING}", "", payload["commentary"].strip(), ""]
    return "\n".join(lines)


def write_outputs(payload: dict[str, Any], json_path: Path) -> str:
    """Writes the JSON (the record of truth), the plot and the markdown page rendered from them; returns the page."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload["json_name"] = json_path.name
    write_text_atomically(json_path, json.dumps(payload, indent=2) + "\n")
    intervals = row_intervals(payload["results"], payload["methods"])
    figure = plot_methods(intervals, json_path.with_suffix(".png"))
    page = render_markdown(payload, intervals, figure.name if figure else None)
    json_path.with_suffix(".md").write_text(page)
    return page


SECTION_HEADING = "# Methods side by side"  # of docs/results/methods.md, the page --readme rewrites


def update_section(readme: Path, payload: dict[str, Any], page: str, json_path: Path) -> None:
    """Rewrites the methods section of ``readme`` (docs/results/methods.md: from its heading to the next heading of
    its level) from the results page: what was run, the table, the plot, the claims and the commentary."""
    budget = payload["budget"]
    table = page[page.index("| method | recipe |") :].split("\n\n")[0]
    claims = page[page.index("| claim | rows |") :].split("\n\n")[0] if "| claim | rows |" in page else ""
    link = Path(os.path.relpath(json_path.resolve(), readme.parent.resolve()))
    trained = [name for name in payload["methods"] if name in METHODS and METHODS[name].trainer is not None]
    missing = any(len(_finished(payload["results"], name)) < budget["seeds"] for name in trained)
    seeds = f"{budget['seeds']} seeds per trained row" + (
        " are planned; rows or seeds still missing are filled in by later `--resume` runs." if missing else "."
    )
    intro = (
        f"[{json_path.with_suffix('.md')}]({link.with_suffix('.md')}), regenerated by "
        f"`python benchmarks/quality.py --budget {payload['budget_name']}` (resumable: `--resume`, `--max-runs N`; "
        f"this section: `--render {json_path} --readme {readme}`). The demo's student (the "
        f"{budget['student_layers']} SmolLM2-135M-Instruct layers of highest block influence) trained by every "
        f"method with the same steps, batch, schedule and seeds: {budget['steps']} steps, batch {budget['batch']}, "
        f"lr {budget['learning_rate']:g} cosine, max_length {budget['max_length']}; {budget['eval_samples']} "
        f"held-out prompts, {budget['max_new_tokens']} new tokens, greedy. Rows marked `cache` train from the "
        f"offline teacher cache (top-{budget['cache_top_k']} unless the recipe says otherwise), `live` rows run the "
        "teacher at every step. Intervals: 95% bootstrap over prompts and seeds; every answer and per-prompt score "
        f"is kept in the JSON. {seeds}"
    )
    section = [SECTION_HEADING, "", textwrap.fill(intro, 116, break_on_hyphens=False), "", table, ""]
    section += [f"![Rouge-L and KL per method, 95% intervals]({link.with_suffix('.png')})", ""]
    if claims:
        section += [
            "The papers' claims, as paired bootstraps of the difference (row - baseline) over the same prompts;",
            f"`cannot tell`: both intervals contain 0 (or lie inside ±{EQUAL_ROUGE_L} Rouge-L, ±{EQUAL_KL} nats).",
            "",
            claims,
            "",
        ]
    if payload.get("commentary"):
        section += [f"## {FINDINGS_HEADING}", "", payload["commentary"].strip(), ""]
    replace_readme_section(readme, SECTION_HEADING, section)


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...); default: the budget's")
    parser.add_argument("--steps", type=int, help="override the budget's training steps")
    parser.add_argument("--eval-samples", type=int, help="override the budget's held-out prompts")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16), help="torch/OMP threads")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/quality_<budget>.json)")
    parser.add_argument("--resume", action="store_true", help="keep the JSON's finished runs, run only the rest")
    parser.add_argument("--max-runs", type=int, help="stop after this many new runs (the rest resume later)")
    parser.add_argument("--render", type=Path, help="only rewrite the markdown page of this results JSON")
    parser.add_argument("--commentary", type=Path, help="with --render: store this text as the findings section")
    parser.add_argument("--readme", type=Path, help="with --render: also rewrite this page's methods section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_budget(args: argparse.Namespace) -> Budget:
    """The named budget with the command line's overrides."""
    overrides = {"seeds": args.seeds, "steps": args.steps, "eval_samples": args.eval_samples}
    return dataclasses.replace(BUDGETS[args.budget], **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        record = run_child(RunSpec.from_dict(json.loads(args.child)))
        Path(args.child_out).write_text(json.dumps(record))
        return
    if args.render:
        payload = json.loads(args.render.read_text())
        if args.commentary:
            payload["commentary"] = args.commentary.read_text()
        page = write_outputs(payload, args.render)
        if args.readme:
            update_section(args.readme, payload, page, args.render)
        print(page)
        return
    budget = build_budget(args)
    json_path = args.out or RESULTS_DIR / f"quality_{args.budget}.json"
    command = " ".join(["python benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    payload: dict[str, Any] = {
        "budget_name": args.budget,
        "budget": dataclasses.asdict(budget),
        "threads": args.threads,
        "environment": environment(),
        "methods": list(METHODS),
        "commands": [command],
        "wall_s": 0.0,
        "results": [],
    }
    if args.resume and json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous["budget"] != payload["budget"]:
            raise SystemExit(f"{json_path} was made with another budget; drop --resume or pass --out.")
        payload |= {k: previous[k] for k in ("commands", "wall_s", "results", "commentary") if k in previous}
        payload["results"] = [r for r in payload["results"] if "error" not in r]
        payload["commands"].append(command)
    done = {(r["method"], r["seed"]) for r in payload["results"]}
    todo = [
        (seed, name)
        for seed in range(budget.seeds)
        for name in args.methods
        if (name, seed) not in done and not (METHODS[name].trainer is None and seed > 0)  # eval-only: one seed
    ]
    for seed, name in todo[: args.max_runs]:
        spec = RunSpec(method=name, seed=seed, budget=budget, threads=args.threads)
        started = time.perf_counter()
        record = run_in_subprocess(spec, args.timeout)
        payload["wall_s"] += time.perf_counter() - started
        payload["results"].append(record)
        write_outputs(payload, json_path)
        status = record.get("error") or f"Rouge-L {record['rouge_l']:.2f}, KL {record.get('kl', float('nan')):.3f}"
        print(f"[{time.perf_counter() - started:6.0f} s] {name} seed {seed}: {status}", flush=True)
    print(write_outputs(payload, json_path))


if __name__ == "__main__":
    main()
