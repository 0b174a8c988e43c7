"""The loss side alone: on random hidden states, the student head forward and backward, the teacher head forward and
one divergence, for every hf_kd term, DSKD, TRL's fused kernel, Liger's fused JSD and the head matmuls alone (the
floor), in interleaved rounds; see ``speed_memory.py --loss-side`` and ``benchmarks/README.md``."""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from harness import cell, environment, format_table, percent, write_text_atomically
from meters import StepTimer, run_in_subprocess
from shapes import SMOLLM2_135M, SMOLLM2_360M, ModelShape, build_model

LOSS_SIDE_TERMS = ("fkl", "rkl", "jsd", "sfkl", "srkl", "akl", "bild", "dac_kl")
LOSS_SIDE_METHODS = ("floor", "trl-chunked", "liger-jsd", *LOSS_SIDE_TERMS, "dskd")


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
        ratios = [cell(r.get(f"x_{ref}"), ".2f") for ref in ("floor", "trl-chunked", "jsd")]
        peaks = [cell(r["peak_mem_mib"], ".0f"), cell(r.get("peak_x_trl-chunked"), ".2f")]
        if peak_tflops:
            mfu = r.get("head_tflops_per_s")
            cells += [cell(r["step_time_s"] * 1e3, ".1f"), cell(r["tokens_per_s"], ",.0f"), *ratios]
            cells += [percent(mfu / peak_tflops if mfu else None, ".1f"), *peaks]
        else:
            cells += [cell(r["cpu_time_s"], ".2f"), cell(r["step_time_s"], ".2f"), *ratios, *peaks]
            cells.append(cell(r["minor_faults_per_step"], ".0f"))
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
