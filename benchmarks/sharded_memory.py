"""Peak memory per rank on the CPU: FSDP2 on 2 ranks vs DDP on 2 ranks vs 1 process, fused loss on and off.

Same global batch everywhere (2 rows per rank on 2 ranks, 4 rows in one process), same random-weight Llama
student and teacher (tied embeddings), AKL, off-policy, a few AdamW steps through `DistillationTrainer`'s
training step. FSDP2 = `torch.distributed.fsdp.fully_shard` on every decoder layer and the root, student and
(frozen) teacher; DDP = `DistributedDataParallel` student, replicated teacher. Every configuration runs in fresh
processes (`torchrun` on gloo for 2 ranks); the peak is the process's resident-set high-water mark
(`ru_maxrss`) and, separately, the resident memory before the training steps and the peak during them (Linux
VmRSS/VmHWM, the peak reset after the models are sharded), above the process's RSS before the models were built.
Usage (about 10 minutes on 2 cores)::

    OMP_NUM_THREADS=1 python benchmarks/sharded_memory.py

Results: ``benchmarks/results/sharded_memory_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from harness import format_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VOCAB, SEQ, GLOBAL_BATCH, STEPS = 32768, 128, 4, 3
STUDENT = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536)
TEACHER = dict(hidden=1024, layers=6, heads=16, kv_heads=8, intermediate=3072)
MODES = ("single", "ddp", "fsdp2")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak since start or the last reset), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(mode: str, fused: bool, out: Path) -> None:
    """One rank (or the single process): build, shard or wrap, train STEPS steps, write its peak."""
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from shapes import ModelShape, build_model, build_tokenizer

    from hf_kd import DistillationConfig, DistillationTrainer

    torch.set_num_threads(1)
    baseline = peak_mib()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = GLOBAL_BATCH // world
    tokenizer = build_tokenizer(VOCAB)
    student = build_model(ModelShape(**STUDENT), VOCAB, SEQ, seed=1)
    teacher = build_model(ModelShape(**TEACHER), VOCAB, SEQ, seed=2)
    args = DistillationConfig(
        output_dir=str(out / "run"),
        kd_loss="akl",
        fused_loss=fused,
        use_cpu=True,
        bf16=False,
        report_to="none",
        lmbda=0.0,
        per_device_train_batch_size=per_rank,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list([{"messages": [{"role": "user", "content": "x"}]}]),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = trainer.model
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for m in (trainer.model, trainer.teacher_model):
            for layer in m.model.layers:
                fully_shard(layer)
            fully_shard(m)
    elif mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(trainer.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if dist.is_initialized():
        dist.barrier()
    reset_peak()
    resident = status_mib("VmRSS")
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        ids = torch.randint(2, VOCAB, (per_rank, SEQ), generator=g)
        labels = ids.clone()
        labels[:, : SEQ // 2] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        loss = trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    record = {"mode": mode, "fused": fused, "rank": rank, "world": world, "loss": loss.item()}
    record |= {
        "process_peak_rss_mib": round(peak_mib(), 1),
        "baseline_rss_mib": round(baseline, 1),
        "resident_before_steps_mib": round(resident, 1),
        "peak_during_steps_mib": round(status_mib("VmHWM"), 1),
    }
    (out / f"{mode}-{fused}-rank{rank}.json").write_text(json.dumps(record))


def launch(mode: str, fused: bool, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    script = [str(Path(__file__).resolve()), "--worker", mode, str(fused), str(out)]
    if mode == "single":
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *script]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} fused={fused} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{mode}-{fused}-rank*.json"))]


def markdown(records: list[dict]) -> str:
    lines = [
        f"Llama student d={STUDENT['hidden']} x{STUDENT['layers']}, teacher d={TEACHER['hidden']} "
        f"x{TEACHER['layers']} (tied embeddings), vocabulary {VOCAB}, sequence {SEQ}, global batch {GLOBAL_BATCH}, "
        f"AKL, {STEPS} AdamW steps, fp32, CPU, one thread per rank; the rank with the highest peak. Resident = RSS "
        "after the models were built, sharded or wrapped and the optimizer made, minus the RSS before the models "
        "were built (Python, torch, libraries); peak = highest RSS during the steps, minus the same baseline; "
        "process peak = ru_maxrss over the whole process (includes building the full models before sharding). MiB.",
        "",
    ]
    rows = []
    for r in records:
        base = r["baseline_rss_mib"]
        rows.append(
            [r["mode"], "on" if r["fused"] else "off", str(r["world"]), str(GLOBAL_BATCH // r["world"])]
            + [f"{r['resident_before_steps_mib'] - base:.0f}", f"{r['peak_during_steps_mib'] - base:.0f}"]
            + [f"{r['process_peak_rss_mib']:.0f}"]
        )
    head = ["configuration", "fused loss", "ranks", "rows per rank", "resident", "peak during steps", "process peak"]
    return "\n".join(lines) + "\n" + format_table(head, rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3] == "True", Path(sys.argv[4]))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            for fused in (True, False):
                ranks = launch(mode, fused, Path(tmp))
                rows.append(max(ranks, key=lambda r: r["peak_during_steps_mib"]))
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sharded_memory_cpu.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "sharded_memory_cpu.md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
