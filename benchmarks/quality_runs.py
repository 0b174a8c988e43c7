"""One run of the quality benchmark: a row and seed of benchmarks/quality.py trained (unless evaluation-only) on
fresh real models and scored on the held-out sets, in a fresh process whose record the command line collects."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import run_in_fresh_process  # noqa: E402  (offline defaults, this checkout's hf_kd)
from quality_rows import METHODS, SMOLLM2, Budget, RunSpec  # noqa: E402

CLI = Path(__file__).resolve().with_name("quality.py")
"""The script a fresh process runs (its ``--child`` mode calls :func:`run_child`)."""


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
    record = run_in_fresh_process(CLI, spec, spec.threads, timeout)
    if "error" in record:
        return {"method": spec.method, "seed": spec.seed, **record}
    return record | {"wall_s": time.perf_counter() - started}
