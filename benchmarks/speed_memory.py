"""Speed and memory of hf_kd's DistillationTrainer against TRL's GKDTrainer, in the same conditions.

Every configuration runs in a fresh subprocess on the same randomly initialised models (built from configs)
and the same batches, off-policy (lmbda=0), so the comparison is about the loss path. Besides the trainers,
two reference runs isolate the model cost: ``student-fb`` (a full training step whose loss is a trivial
function of the student's last hidden states: no vocabulary head, no distillation loss) and ``teacher-f``
(the teacher body forward, no head, under no_grad). Loss-side overhead = (step - student-fb - teacher-f) / step.
A third reference, ``heads``, times the vocabulary heads alone on the response rows (student head forward and
backward, teacher head forward): engine overhead = (step - student-fb - teacher-f - heads) / step is what the
loss computation itself adds beyond the unavoidable head matmuls.

Usage::

    python benchmarks/speed_memory.py --preset cpu-small      # CPU, fp32, a few minutes per vocabulary
    python benchmarks/speed_memory.py --preset full           # real SmolLM2 shapes, on a GPU (bf16)

Results go to ``benchmarks/results/speed_memory_<preset>.json`` and ``.md``; see ``benchmarks/README.md``.

``--loss-side`` times the loss side alone instead (no model bodies, no trainer): on ``--rows`` response rows of
random hidden states, the student head forward and backward, the teacher head forward and the divergence, for
every hf_kd term, DSKD (its four heads and projectors), TRL 1.16's fused ``ChunkedDivergenceFunction``
(generalized JSD, beta 0.5; Triton on a GPU), Liger's fused linear JSD (when installed) and the head matmuls alone
(the floor). On a GPU the heads run under bf16 autocast (``--bf16``) and the table adds tokens/s and the head
matmuls' MFU. Each round runs every configuration once, in a fresh subprocess (so its peak memory
is its own), and rounds interleave the configurations, so a load change on a shared machine hits all alike::

    python benchmarks/speed_memory.py --loss-side --vocabs 151936 262144 --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, format_table, run_in_fresh_process, write_text_atomically  # noqa: E402  (offline defaults, shared with quality.py)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS_DIR.parent.parent))  # time this checkout's hf_kd, not another installed copy
TRL_METHODS = ("trl", "trl-liger")
HF_KD_METHODS = ("jsd", "akl", "bild", "dac_kl+span", "dskd")
REFERENCE_METHODS = ("student-fb", "teacher-f", "heads")
ALL_METHODS = TRL_METHODS + HF_KD_METHODS + REFERENCE_METHODS
LOSS_SIDE_TERMS = ("fkl", "rkl", "jsd", "sfkl", "srkl", "akl", "bild", "dac_kl")
LOSS_SIDE_METHODS = ("floor", "trl-chunked", "liger-jsd", *LOSS_SIDE_TERMS, "dskd")
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet, without sparsity)


@dataclass
class ModelShape:
    """A Llama-architecture model shape (tied input/output embeddings, like SmolLM2)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SMOLLM2_135M = ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536)
SMOLLM2_360M = ModelShape(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560)


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


# ---------------------------------------------------------------------------------------------- availability
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


# ---------------------------------------------------------------------------------------------- inputs
def build_tokenizer(vocab: int):
    """A word-level tokenizer covering the whole model vocabulary, so any id decodes (the span loss needs text).

    Ids 0 and 1 are <pad> and <eos>; every 16th id is a sentence-ending word, so random text has sentences.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>"] + [f"Tok{i}." if i % 16 == 0 else f"Tok{i}" for i in range(2, vocab)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


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


def build_model(shape: ModelShape, vocab: int, seq: int, seed: int):
    """A randomly initialised Llama causal LM of ``shape`` with tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(2048, seq),
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------- measuring
class MemoryMeter:
    """Peak memory of the measured steps: GPU allocator peak, or the process's resident-set high-water mark.

    On CPU the kernel's VmHWM is reset (``/proc/self/clear_refs`` <- 5) when measuring starts, so the peak is
    that of the measured steps only; ``baseline`` is the resident memory at that moment (weights, optimizer
    state, allocator caches).
    """

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0.0

    @staticmethod
    def _status_kib(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1))

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = self._status_kib("VmRSS") / 1024

    def peak(self) -> float:
        """Peak memory since ``start`` in MiB (absolute: it includes ``baseline``)."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return self._status_kib("VmHWM") / 1024


class StepTimer:
    """Times steps and starts the memory meter before the first measured step (a ``TrainerCallback``)."""

    def __init__(self, spec: RunSpec | LossSideSpec):
        self.spec = spec
        self.meter = MemoryMeter(spec.device)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.peak = 0.0
        self._t0 = self._c0 = 0.0

    def _sync(self) -> None:
        import torch

        if self.spec.device == "cuda":
            torch.cuda.synchronize()

    def begin(self, step: int) -> None:
        if step == self.spec.warmup:
            self.meter.start()
        self._sync()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def end(self, step: int) -> None:
        self._sync()
        elapsed, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        if step >= self.spec.warmup:
            self.times.append(elapsed)
            self.cpu_times.append(cpu)
            self.peak = max(self.peak, self.meter.peak())


def _timer_callback(timer: StepTimer):
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            timer.end(state.global_step - 1)

    return _Callback()


# ---------------------------------------------------------------------------------------------- one run
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
        return {**_describe(spec), "skipped": reason}
    tokenizer = build_tokenizer(spec.vocab)
    rows = build_batches(spec)
    teacher = build_model(spec.teacher, spec.vocab, spec.seq, spec.seed + 1)
    teacher_dtype = torch.bfloat16 if spec.device == "cuda" else torch.float32
    teacher.to(device=spec.device, dtype=teacher_dtype)
    timer = StepTimer(spec)
    result = _describe(spec) | {"params_teacher": count_parameters(teacher)}
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


def _describe(spec: RunSpec | LossSideSpec) -> dict[str, Any]:
    if isinstance(spec, LossSideSpec):
        return {"method": spec.method, "vocab": spec.vocab, "rows": spec.rows}
    return {"method": spec.method, "vocab": spec.vocab, "seq": spec.seq, "batch": spec.batch}


# ---------------------------------------------------------------------------------------------- loss side
@dataclass
class LossSideSpec:
    """One loss-side configuration: ``rows`` response rows through both heads and one divergence."""

    method: str
    vocab: int
    rows: int = 384
    student_hidden: int = SMOLLM2_135M.hidden
    teacher_hidden: int = SMOLLM2_360M.hidden
    warmup: int = 1
    steps: int = 1
    device: str = "cpu"
    threads: int = 2
    seed: int = 0
    chunk_size: int | None = None
    teacher_scale: float = 6.0
    bf16: bool = False

    @property
    def head_flops(self) -> float:
        """Student head forward + backward (input and weight gradients) and teacher head forward."""
        return 2.0 * self.rows * self.vocab * (3 * self.student_hidden + self.teacher_hidden)


def _loss_side_inputs(spec: LossSideSpec):
    """Seeded heads (bias-free nn.Linear, default init) and hidden states; the teacher's are scaled so that its
    distributions are peaked like a trained LM's (about half the mass in the top 64) rather than flat. With
    ``bf16`` the teacher side is bfloat16 and the student keeps float32 weights (a mixed-precision trainer's)."""
    import torch

    torch.manual_seed(spec.seed)
    teacher_dtype = torch.bfloat16 if spec.bf16 else torch.float32
    head_s = torch.nn.Linear(spec.student_hidden, spec.vocab, bias=False).to(spec.device)
    head_t = torch.nn.Linear(spec.teacher_hidden, spec.vocab, bias=False).to(spec.device, teacher_dtype)
    head_t.requires_grad_(False)
    g = torch.Generator().manual_seed(spec.seed)
    h_s = (torch.randn(spec.rows, spec.student_hidden, generator=g) * 3).to(spec.device)
    h_t = torch.randn(spec.rows, spec.teacher_hidden, generator=g) * spec.teacher_scale
    h_t = h_t.to(spec.device, teacher_dtype)
    labels = torch.randint(0, spec.vocab, (spec.rows,), generator=g).to(spec.device)
    return head_s, head_t, h_s, h_t, labels


def _loss_side_step(spec: LossSideSpec, head_s, head_t, h_s, h_t, labels):
    """One step's function: returns the loss value (or None for the floor), gradients left on ``head_s``/``x``."""
    import torch

    if spec.method == "floor":
        upstream = torch.ones(spec.rows, spec.vocab, device=spec.device)

        def step():
            x = h_s.clone().requires_grad_(True)
            head_s(x).backward(upstream)
            with torch.no_grad():
                head_t(h_t)

        return step
    if spec.method == "trl-chunked":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def step():
            x = h_s.clone().requires_grad_(True)
            divergence, _ = ChunkedDivergenceFunction.apply(x, head_s.weight, None, h_t, head_t.weight, None, 0.5)
            loss = divergence.mean()
            loss.backward()
            return loss.item()

        return step
    if spec.method == "liger-jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)

        def step():
            x = h_s.clone().requires_grad_(True)
            loss = liger(x, head_s.weight, h_t, head_t.weight, labels)
            loss.backward()
            return loss.item()

        return step
    from hf_kd.losses import build_loss

    loss_fn = build_loss(spec.method, chunk_size=spec.chunk_size).to(spec.device)

    def step():
        x = h_s.clone().requires_grad_(True)
        loss = loss_fn.forward_fused(x[None], head_s, h_t[None], head_t, labels[None])
        loss.backward()
        return loss.item()

    return step


def _dskd_step(spec: LossSideSpec):
    """DSKD's loss side (same vocabulary): its four head passes (student and teacher heads on their own hidden
    states, the student head on the teacher's projected states, the teacher head on the student's) and both
    projectors, through ``DSKDBridge.compute_loss`` on models of one single-head decoder layer (the bodies cost
    next to nothing beside the heads). Returns (step, the student model)."""
    from types import SimpleNamespace

    import torch

    from hf_kd.bridge import DSKDBridge

    def model(hidden: int):
        shape = ModelShape(hidden=hidden, layers=1, heads=1, kv_heads=1, intermediate=hidden)
        return build_model(shape, spec.vocab, spec.rows + 1, spec.seed).to(spec.device)

    student = model(spec.student_hidden)
    teacher = model(spec.teacher_hidden).to(torch.bfloat16 if spec.bf16 else torch.float32).requires_grad_(False)
    args = SimpleNamespace(kd_loss="fkl", kd_temperature=None, kd_rate=0.5, loss_chunk_size=spec.chunk_size)
    bridge = DSKDBridge(student, teacher, args)
    g = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, spec.vocab, (1, spec.rows + 1), generator=g).to(spec.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        bridge.zero_grad(set_to_none=True)
        loss, _ = bridge.compute_loss(student, teacher, inputs)
        loss.backward()
        return loss.item()

    return step, student


def run_loss_side(spec: LossSideSpec) -> dict[str, Any]:
    """Times one loss-side configuration in this process (seconds, MiB, minor page faults per step)."""
    import resource

    import torch

    from hf_kd.losses.cpu_allocator import tune_for_chunks

    torch.set_num_threads(spec.threads)
    if spec.method not in ("trl-chunked", "liger-jsd"):  # the other libraries run as shipped
        tune_for_chunks()  # as DistillationTrainer does on CPU; the floor gets it too (a lower floor)
    result = {"method": spec.method, "vocab": spec.vocab, "rows": spec.rows}
    if spec.method in LOSS_SIDE_TERMS:
        from hf_kd.losses import LOSS_REGISTRY

        if spec.method not in LOSS_REGISTRY:
            return result | {"skipped": f"loss term {spec.method} is not registered"}
    if spec.method == "liger-jsd" and importlib.util.find_spec("liger_kernel") is None:
        return result | {"skipped": "liger_kernel is not installed"}
    if spec.method == "dskd":
        step, trained = _dskd_step(spec)
    else:
        inputs = _loss_side_inputs(spec)
        step, trained = _loss_side_step(spec, *inputs), inputs[0]
    timer = StepTimer(spec)
    faults, value = [], None
    autocast = torch.autocast(spec.device, dtype=torch.bfloat16, enabled=spec.bf16)
    for i in range(spec.warmup + spec.steps):
        trained.zero_grad(set_to_none=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        timer.begin(i)
        with autocast:
            value = step()
        timer.end(i)
        if i >= spec.warmup:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return result | {
        "step_times_s": timer.times,
        "cpu_times_s": timer.cpu_times,
        "peak_mem_mib": timer.peak,
        "baseline_mem_mib": timer.meter.baseline,
        "minor_faults": faults,
        "loss": value,
    }


def merge_rounds(records: list[dict[str, Any]], gpu: bool = False) -> list[dict[str, Any]]:
    """One record per (vocab, method) from the rounds' records: median times, largest peak, ratios to the floor,
    to TRL's chunked kernel and to jsd (on CPU time on a CPU, wall clock on a GPU), tokens/s and the head
    matmuls' achieved TFLOP/s (MFU = that over the GPU's peak)."""
    merged: dict[tuple, dict[str, Any]] = {}
    for r in records:
        m = merged.setdefault((r["vocab"], r["method"]), {k: r[k] for k in ("method", "vocab", "rows")})
        if "step_times_s" not in r:
            m.setdefault("errors", []).append(r.get("skipped") or r.get("error"))
            continue
        for key in ("step_times_s", "cpu_times_s", "minor_faults"):
            m.setdefault(key, []).extend(r[key])
        m["peak_mem_mib"] = max(m.get("peak_mem_mib", 0.0), r["peak_mem_mib"])
        m["loss"] = r["loss"]
        m["head_flops"] = r.get("head_flops")
    for m in merged.values():
        if "step_times_s" in m:
            m["step_time_s"] = statistics.median(m["step_times_s"])
            m["cpu_time_s"] = statistics.median(m["cpu_times_s"])
            m["minor_faults_per_step"] = statistics.median(m["minor_faults"])
            m["tokens_per_s"] = m["rows"] / m["step_time_s"]
            if m.get("head_flops"):
                m["head_tflops_per_s"] = m["head_flops"] / m["step_time_s"] / 1e12
    basis = "step_time_s" if gpu else "cpu_time_s"
    for (vocab, _), m in merged.items():
        for ref in ("floor", "trl-chunked", "jsd"):
            other = merged.get((vocab, ref))
            if "step_time_s" in m and other and "step_time_s" in other:
                m[f"x_{ref}"] = m[basis] / other[basis]
                m[f"wall_x_{ref}"] = m["step_time_s"] / other["step_time_s"]
                m[f"peak_x_{ref}"] = m["peak_mem_mib"] / other["peak_mem_mib"]
    return list(merged.values())


def loss_side_table(results: list[dict[str, Any]], peak_tflops: float | None = None) -> str:
    """The merged loss-side records as a markdown table (GPU: ``peak_tflops`` given, ratios on wall clock, with
    tokens/s and MFU of the head matmuls; CPU: ratios on CPU time, with page faults)."""
    if peak_tflops:
        head = ["vocab", "method", "ms", "tokens/s", "×floor", "×TRL", "×jsd", "MFU", "peak MiB", "peak ×TRL"]
    else:
        head = ["vocab", "method", "CPU s", "wall s", "×floor", "×TRL", "×jsd", "peak MiB", "peak ×TRL", "faults/step"]
    rows = []
    for r in results:
        cells = [str(r["vocab"]), r["method"]]
        if "step_time_s" not in r:
            rows.append(cells + ["; ".join(map(str, r.get("errors", [])))] + ["-"] * (len(head) - 3))
            continue
        ratios = [_fmt(r.get(f"x_{ref}"), ".2f") for ref in ("floor", "trl-chunked", "jsd")]
        peaks = [_fmt(r["peak_mem_mib"], ".0f"), _fmt(r.get("peak_x_trl-chunked"), ".2f")]
        if peak_tflops:
            mfu = r.get("head_tflops_per_s")
            cells += [_fmt(r["step_time_s"] * 1e3, ".1f"), _fmt(r["tokens_per_s"], ",.0f"), *ratios]
            cells += [_percent(mfu / peak_tflops if mfu else None, ".1f"), *peaks]
        else:
            cells += [_fmt(r["cpu_time_s"], ".2f"), _fmt(r["step_time_s"], ".2f"), *ratios, *peaks]
            cells.append(_fmt(r["minor_faults_per_step"], ".0f"))
        rows.append(cells)
    return format_table(head, rows)


def run_loss_side_rounds(args: argparse.Namespace, argv: list[str] | None, device: str) -> str:
    """``--rounds`` rounds over every (vocab, method), each configuration in a fresh subprocess."""
    records: list[dict[str, Any]] = []
    methods = args.methods or list(LOSS_SIDE_METHODS)
    unknown = sorted(set(methods) - set(LOSS_SIDE_METHODS))
    if unknown:
        raise SystemExit(f"--loss-side runs {' '.join(LOSS_SIDE_METHODS)}; {unknown} are trainer methods.")
    gpu = device == "cuda"
    tag = args.tag or ("loss-side-gpu" if gpu else "loss-side")
    bf16 = args.bf16 if args.bf16 is not None else gpu
    table = ""
    for round_index in range(args.rounds):
        for vocab in args.vocabs or (151936, 262144):
            for method in methods:
                spec = LossSideSpec(
                    method=method,
                    vocab=vocab,
                    rows=args.rows,
                    warmup=1 if args.warmup is None else args.warmup,
                    steps=args.steps or 1,
                    device=device,
                    threads=args.threads,
                    chunk_size=args.chunk_size,
                    bf16=bf16,
                )
                started = time.perf_counter()
                record = run_in_subprocess(spec, args.timeout) | {"head_flops": spec.head_flops}
                records.append(record)
                status = record.get("skipped") or record.get("error") or f"cpu {record['cpu_times_s']}"
                print(f"[{time.perf_counter() - started:5.0f} s] round {round_index} vocab {vocab} {method}: {status}")
                sys.stdout.flush()
                merged = merge_rounds(records, gpu)
                payload = {
                    "mode": "loss-side",
                    "device": device,
                    "dtype": "bf16 autocast (student weights float32, teacher bfloat16)" if bf16 else "float32",
                    "peak_tflops": args.peak_tflops if gpu else None,
                    "threads": args.threads,
                    "command": " ".join(["python", "benchmarks/speed_memory.py", *(argv or sys.argv[1:])]),
                    "environment": environment(),
                    "results": merged,
                    "records": records,
                }
                args.out_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomically(args.out_dir / f"speed_memory_{tag}.json", json.dumps(payload, indent=2) + "\n")
                table = loss_side_table(merged, args.peak_tflops if gpu else None)
                (args.out_dir / f"speed_memory_{tag}.md").write_text(table)
    return table


# ---------------------------------------------------------------------------------------------- many runs
def run_in_subprocess(spec: RunSpec | LossSideSpec, timeout: float) -> dict[str, Any]:
    """Runs ``spec`` in a fresh Python process (so peak memory is per configuration); errors become a record."""
    record = run_in_fresh_process(Path(__file__).resolve(), spec, spec.threads, timeout)
    return {**_describe(spec), **record} if "error" in record else record


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


def _overhead_basis(device: str) -> str:
    return "step_time_s" if device == "cuda" else "cpu_time_s"


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _percent(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else f"{100 * value:{spec}}%"


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
                _fmt(r["step_time_s"], ".3f"),
                _fmt(r.get("step_time_x_trl"), ".2f"),
                _fmt(r["cpu_time_s"], ".2f"),
                _fmt(r.get("cpu_time_x_trl"), ".2f"),
                _fmt(r["tokens_per_s"], ".0f"),
                _fmt(r["peak_mem_mib"], ".0f"),
                _fmt(r.get("peak_mem_x_trl"), ".2f"),
                _fmt(r["step_mem_mib"], ".0f"),
                _fmt(r.get("step_mem_x_trl"), ".2f"),
                _percent(r.get("loss_side_fraction")),
                _percent(r.get("engine_fraction")),
            ]
            if cuda:
                cells.append(_percent(r.get("mfu"), ".1f"))
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted({*ALL_METHODS, *LOSS_SIDE_METHODS}),
        help=f"default: {' '.join(ALL_METHODS)}; with --loss-side: {' '.join(LOSS_SIDE_METHODS)}",
    )
    parser.add_argument("--loss-side", action="store_true", help="time the loss side alone (see the module doc)")
    parser.add_argument("--rows", type=int, default=384, help="response rows for --loss-side")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --loss-side")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="--loss-side under bf16 autocast, teacher head in bf16 (default: on a GPU only)",
    )
    parser.add_argument("--vocabs", nargs="+", type=int, help="override the preset's vocabulary sizes")
    parser.add_argument("--seqs", nargs="+", type=int, help="override the preset's sequence lengths")
    parser.add_argument("--batch", type=int, help="override the preset's batch size")
    parser.add_argument("--steps", type=int, help="measured steps (after warm-up)")
    parser.add_argument("--warmup", type=int, help="warm-up steps, not measured")
    parser.add_argument("--prompt-fraction", type=float, default=0.25, help="leading tokens labelled -100")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16), help="torch/OMP threads")
    parser.add_argument("--chunk-size", type=int, help="hf_kd loss_chunk_size (default: the engine's choice)")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="GPU peak for MFU")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", help="result file name suffix (default: the preset)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    parser.add_argument("--render", type=Path, help="only rewrite the markdown table of this results JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child = json.loads(args.child)  # a LossSideSpec has "rows", a RunSpec "seq"
        result = run_loss_side(LossSideSpec(**child)) if "rows" in child else run_config(RunSpec.from_dict(child))
        Path(args.child_out).write_text(json.dumps(result))
        return
    if args.render:
        payload = json.loads(args.render.read_text())
        add_ratios(payload["results"], _overhead_basis(payload["device"]))
        table = markdown_table(payload["results"], cuda=payload["device"] == "cuda")
        write_text_atomically(args.render, json.dumps(payload, indent=2) + "\n")
        args.render.with_suffix(".md").write_text(table)
        print(table)
        return
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.loss_side:
        print(run_loss_side_rounds(args, argv, device))
        return
    results: list[dict[str, Any]] = []
    for spec in build_specs(args, device):
        started = time.perf_counter()
        result = run_in_subprocess(spec, args.timeout)
        results.append(result)
        status = result.get("skipped") or result.get("error") or f"step {result['step_time_s']:.3f} s"
        print(f"[{time.perf_counter() - started:6.0f} s] vocab {spec.vocab} seq {spec.seq} {spec.method}: {status}")
        sys.stdout.flush()
        table = write_results(args, argv, device, results)
    print(table)


def write_results(args: argparse.Namespace, argv: list[str] | None, device: str, results: list[dict[str, Any]]) -> str:
    """Writes the JSON and markdown files (after every configuration, so a partial run leaves its results)."""
    add_ratios(results, _overhead_basis(device))
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


if __name__ == "__main__":
    main()
