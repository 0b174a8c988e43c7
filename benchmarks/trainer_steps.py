"""Whole training steps: hf_kd's DistillationTrainer against TRL's GKDTrainer on the same random models and batches,
with the reference runs that isolate the model cost (``student-fb``, ``teacher-f``, ``heads``); see
``speed_memory.py`` for the command line and ``benchmarks/README.md`` for the method."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from harness import cell, environment, format_table, percent, write_text_atomically
from meters import StepTimer, describe
from shapes import SMOLLM2_135M, SMOLLM2_360M, ModelShape, build_model, build_tokenizer, count_parameters

TRL_METHODS = ("trl", "trl-liger")
HF_KD_METHODS = ("jsd", "akl", "bild", "dac_kl+span", "dskd")
REFERENCE_METHODS = ("student-fb", "teacher-f", "heads")
ALL_METHODS = TRL_METHODS + HF_KD_METHODS + REFERENCE_METHODS
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet, without sparsity)


@dataclass
class Preset:
    """A grid of shapes and the number of steps to time."""

    student: ModelShape
    teacher: ModelShape
    vocabs: tuple[int, ...]
    seqs: tuple[int, ...]
    batch: int
    warmup: int
    steps: int


PRESETS = {
    "cpu-small": Preset(
        student=dataclasses.replace(SMOLLM2_135M, layers=4),
        teacher=dataclasses.replace(SMOLLM2_360M, layers=8),
        vocabs=(49152, 151936, 262144),
        seqs=(256,),
        batch=2,
        warmup=1,
        steps=2,
    ),
    "full": Preset(
        student=SMOLLM2_135M,
        teacher=SMOLLM2_360M,
        vocabs=(49152, 151936, 262144),
        seqs=(512, 1024),
        batch=4,
        warmup=3,
        steps=10,
    ),
}


@dataclass
class RunSpec:
    """One configuration, run in one process (JSON-serialisable so a parent can hand it to a child)."""

    method: str
    vocab: int
    seq: int
    batch: int
    student: ModelShape
    teacher: ModelShape
    warmup: int = 1
    steps: int = 3
    prompt_fraction: float = 0.25
    device: str = "cpu"
    threads: int = 2
    seed: int = 0
    chunk_size: int | None = None
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    output_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="kd_bench_"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        data = dict(data)
        data["student"] = ModelShape(**data["student"])
        data["teacher"] = ModelShape(**data["teacher"])
        return cls(**data)


def method_unavailable(method: str, device: str) -> str | None:
    """Why ``method`` cannot run in this checkout/on this device (None when it can)."""
    if method == "trl-liger":
        if device != "cuda":
            return "needs a GPU"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
    if method == "dac_kl+span":
        from hf_kd.losses import LOSS_REGISTRY

        missing = [name for name in ("dac_kl", "span") if name not in LOSS_REGISTRY]
        if missing:
            return f"loss terms not registered: {missing}"
    if method == "dskd":
        try:
            importlib.import_module("hf_kd.bridge.dskd")
        except ImportError as err:
            return f"hf_kd.bridge.dskd cannot be imported: {err}"
    return None


def build_batches(spec: RunSpec) -> list[dict[str, list[int]]]:
    """Fixed random token rows (same for every configuration); the first ``prompt_fraction`` is the prompt."""
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    n_rows = spec.batch * (spec.warmup + spec.steps)
    ids = torch.randint(2, spec.vocab, (n_rows, spec.seq), generator=g)
    prompt = int(spec.seq * spec.prompt_fraction)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in zip(ids, labels)]


class FixedCollator:
    """Stacks pre-tokenized rows into the batch GKD expects (input_ids, attention_mask, labels, prompts)."""

    def __init__(self, prompt_length: int):
        self.prompt_length = prompt_length

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids = torch.tensor([r["input_ids"] for r in rows])
        labels = torch.tensor([r["labels"] for r in rows])
        prompts = ids[:, : max(self.prompt_length, 1)]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "prompts": prompts,
            "prompt_attention_mask": torch.ones_like(prompts),
        }


def _timer_callback(timer: StepTimer):
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            timer.end(state.global_step - 1)

    return _Callback()


def _trainer_kwargs(spec: RunSpec) -> dict[str, Any]:
    """Training arguments shared by TRL's and hf_kd's runs (off-policy, no checkpoint, no logging)."""
    cuda = spec.device == "cuda"
    return {
        "output_dir": spec.output_dir,
        "per_device_train_batch_size": spec.batch,
        "max_steps": spec.warmup + spec.steps,
        "learning_rate": 1e-5,
        "lmbda": 0.0,
        "beta": 0.5,
        "seq_kd": False,
        "bf16": cuda,
        "use_cpu": not cuda,
        "gradient_checkpointing": False,
        "activation_checkpointing": False,
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": "none",
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": spec.seed,
    }


def _make_trainer(spec: RunSpec, student, teacher, tokenizer, dataset, callback):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    kwargs = _trainer_kwargs(spec)
    common = {
        "model": student,
        "teacher_model": teacher,
        "train_dataset": dataset,
        "processing_class": tokenizer,
        "data_collator": FixedCollator(int(spec.seq * spec.prompt_fraction)),
        "callbacks": [callback],
    }
    if spec.method in TRL_METHODS:
        args = GKDConfig(**kwargs, use_liger_kernel=spec.method == "trl-liger")
        return GKDTrainer(args=args, **common)
    if spec.method == "student-fb":
        return _body_only_trainer_class()(args=GKDConfig(**kwargs), **common)
    from hf_kd import DistillationConfig, DistillationTrainer

    if spec.method == "dskd":
        extra = {"kd_loss": "fkl", "bridge": "dskd"}
    else:
        extra = {"kd_loss": spec.method}
    args = DistillationConfig(**kwargs, loss_chunk_size=spec.chunk_size, **extra)
    return DistillationTrainer(args=args, **common)


def _body_only_trainer_class():
    """GKDTrainer whose loss is a trivial function of the student's last hidden states (the model-cost reference)."""
    from trl.experimental.gkd import GKDTrainer

    class BodyOnlyTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            body = self.accelerator.unwrap_model(model).model
            hidden = body(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
            loss = hidden.float().square().mean()
            return (loss, None) if return_outputs else loss

    return BodyOnlyTrainer


def _teacher_forward_times(spec: RunSpec, teacher, batches: list[dict[str, Any]], timer: StepTimer) -> None:
    """Times the teacher body forward (no head) under no_grad, with the trainers' autocast setting."""
    import torch

    teacher.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=spec.device == "cuda")
    for step, batch in enumerate(batches):
        timer.begin(step)
        with torch.no_grad(), autocast:
            teacher.model(
                input_ids=batch["input_ids"].to(spec.device), attention_mask=batch["attention_mask"].to(spec.device)
            )
        timer.end(step)


def _head_times(spec: RunSpec, student, teacher, rows: list[dict[str, Any]], timer: StepTimer) -> None:
    """Times the heads alone on the response rows: student head forward + backward, teacher head forward."""
    import torch

    n_rows = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows[: spec.batch])
    g = torch.Generator().manual_seed(spec.seed)
    h_s = torch.randn(n_rows, spec.student.hidden, generator=g).to(spec.device).requires_grad_(True)
    h_t = torch.randn(n_rows, spec.teacher.hidden, generator=g).to(spec.device, teacher.dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=spec.device == "cuda")
    for step in range(spec.warmup + spec.steps):
        timer.begin(step)
        with autocast:
            student.lm_head(h_s).float().square().mean().backward()
            with torch.no_grad():
                teacher.lm_head(h_t)
        student.zero_grad(set_to_none=True)
        timer.end(step)


def run_config(spec: RunSpec) -> dict[str, Any]:
    """Runs one configuration in this process; returns its measurements (times in s, memory in MiB)."""
    import torch
    from datasets import Dataset

    torch.set_num_threads(spec.threads)
    reason = method_unavailable(spec.method, spec.device)
    if reason is not None:
        return {**describe(spec), "skipped": reason}
    tokenizer = build_tokenizer(spec.vocab)
    rows = build_batches(spec)
    teacher = build_model(spec.teacher, spec.vocab, spec.seq, spec.seed + 1)
    teacher_dtype = torch.bfloat16 if spec.device == "cuda" else torch.float32
    teacher.to(device=spec.device, dtype=teacher_dtype)
    timer = StepTimer(spec)
    result = describe(spec) | {"params_teacher": count_parameters(teacher)}
    if spec.method == "teacher-f":
        collate = FixedCollator(int(spec.seq * spec.prompt_fraction))
        batches = [collate(rows[i : i + spec.batch]) for i in range(0, len(rows), spec.batch)]
        _teacher_forward_times(spec, teacher, batches, timer)
    else:
        student = build_model(spec.student, spec.vocab, spec.seq, spec.seed).to(spec.device)
        result["params_student"] = count_parameters(student)
    if spec.method == "heads":
        _head_times(spec, student, teacher, rows, timer)
    elif spec.method != "teacher-f":
        trainer = _make_trainer(spec, student, teacher, tokenizer, Dataset.from_list(rows), _timer_callback(timer))
        output = trainer.train()
        result["train_loss"] = float(output.training_loss)
    step = statistics.median(timer.times)
    tokens = spec.batch * spec.seq
    result |= {
        "step_times_s": timer.times,
        "step_time_s": step,
        "cpu_times_s": timer.cpu_times,
        "cpu_time_s": statistics.median(timer.cpu_times),
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step,
        "peak_mem_mib": timer.peak,
        "baseline_mem_mib": timer.meter.baseline,
        "step_mem_mib": timer.peak - timer.meter.baseline,
    }
    if spec.device == "cuda" and spec.method not in REFERENCE_METHODS:
        flops = (6 * result["params_student"] + 2 * result["params_teacher"]) * tokens
        result["mfu"] = flops / step / (spec.peak_tflops * 1e12)
    return result


def add_ratios(results: list[dict[str, Any]], basis: str = "step_time_s") -> None:
    """Adds ratios to TRL's run of the same shape, and the loss-side overhead, to each measured record.

    The overhead fractions use ``basis``: wall-clock ``step_time_s`` (GPU), or the process CPU time
    ``cpu_time_s``, which other processes sharing the CPU disturb less than the wall clock.
    """
    by_key = {(r["vocab"], r["seq"], r["method"]): r for r in results if "step_time_s" in r}
    for r in results:
        if "step_time_s" not in r:
            continue
        trl = by_key.get((r["vocab"], r["seq"], "trl"))
        if trl is not None:
            r["step_time_x_trl"] = r["step_time_s"] / trl["step_time_s"]
            r["cpu_time_x_trl"] = r["cpu_time_s"] / trl["cpu_time_s"]
            r["peak_mem_x_trl"] = r["peak_mem_mib"] / trl["peak_mem_mib"]
            r["step_mem_x_trl"] = r["step_mem_mib"] / trl["step_mem_mib"] if trl["step_mem_mib"] > 0 else None
        student = by_key.get((r["vocab"], r["seq"], "student-fb"))
        teacher = by_key.get((r["vocab"], r["seq"], "teacher-f"))
        if student and teacher and r["method"] not in REFERENCE_METHODS:
            r["overhead_basis"] = basis
            r["loss_side_s"] = r[basis] - student[basis] - teacher[basis]
            r["loss_side_fraction"] = r["loss_side_s"] / r[basis]
            heads = by_key.get((r["vocab"], r["seq"], "heads"))
            if heads:
                r["engine_fraction"] = (r["loss_side_s"] - heads[basis]) / r[basis]


def overhead_basis(device: str) -> str:
    return "step_time_s" if device == "cuda" else "cpu_time_s"


def markdown_table(results: list[dict[str, Any]], cuda: bool) -> str:
    """The results as a markdown table (one row per configuration)."""
    head = [
        "vocab",
        "seq",
        "method",
        "step s",
        "step ×TRL",
        "CPU s",
        "CPU ×TRL",
        "tokens/s",
        "peak MiB",
        "peak ×TRL",
        "step mem MiB",
        "step mem ×TRL",
        "loss-side",
        "engine",
    ]
    if cuda:
        head.append("MFU")
    rows = []
    for r in results:
        cells = [str(r["vocab"]), str(r["seq"]), r["method"]]
        if "step_time_s" not in r:
            note = r.get("skipped") and f"skipped: {r['skipped']}" or f"error: {r.get('error')}"
            cells += [note] + ["-"] * (len(head) - 4)
        else:
            cells += [
                cell(r["step_time_s"], ".3f"),
                cell(r.get("step_time_x_trl"), ".2f"),
                cell(r["cpu_time_s"], ".2f"),
                cell(r.get("cpu_time_x_trl"), ".2f"),
                cell(r["tokens_per_s"], ".0f"),
                cell(r["peak_mem_mib"], ".0f"),
                cell(r.get("peak_mem_x_trl"), ".2f"),
                cell(r["step_mem_mib"], ".0f"),
                cell(r.get("step_mem_x_trl"), ".2f"),
                percent(r.get("loss_side_fraction")),
                percent(r.get("engine_fraction")),
            ]
            if cuda:
                cells.append(percent(r.get("mfu"), ".1f"))
        rows.append(cells)
    return format_table(head, rows)


def build_specs(args: argparse.Namespace, device: str) -> list[RunSpec]:
    """The grid of configurations selected by the command line."""
    preset = PRESETS[args.preset]
    specs = []
    for vocab in args.vocabs or preset.vocabs:
        for seq in args.seqs or preset.seqs:
            for method in args.methods or ALL_METHODS:
                specs.append(
                    RunSpec(
                        method=method,
                        vocab=vocab,
                        seq=seq,
                        batch=args.batch or preset.batch,
                        student=preset.student,
                        teacher=preset.teacher,
                        warmup=preset.warmup if args.warmup is None else args.warmup,
                        steps=args.steps or preset.steps,
                        prompt_fraction=args.prompt_fraction,
                        device=device,
                        threads=args.threads,
                        chunk_size=args.chunk_size,
                        peak_tflops=args.peak_tflops,
                    )
                )
    return specs


def write_results(args: argparse.Namespace, argv: list[str] | None, device: str, results: list[dict[str, Any]]) -> str:
    """Writes the JSON and markdown files (after every configuration, so a partial run leaves its results)."""
    add_ratios(results, overhead_basis(device))
    tag = args.tag or args.preset
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "preset": args.preset,
        "device": device,
        "dtype": "bf16 autocast (teacher bf16)" if device == "cuda" else "float32",
        "command": " ".join(["python", "benchmarks/speed_memory.py", *(argv or sys.argv[1:])]),
        "environment": environment(),
        "preset_shapes": dataclasses.asdict(PRESETS[args.preset]),
        "results": results,
    }
    write_text_atomically(args.out_dir / f"speed_memory_{tag}.json", json.dumps(payload, indent=2) + "\n")
    table = markdown_table(results, cuda=device == "cuda")
    (args.out_dir / f"speed_memory_{tag}.md").write_text(table)
    return table
