"""How many [rows, V] float32 buffers each loss term keeps alive at once inside the loss engine, measured.

One fused step (student head forward and backward, teacher head forward, the term) over three chunks, on CPU with
glibc's default malloc (no ``tune_for_chunks`` call: a freed 64 MiB block leaves the resident set at once). The peak
resident memory of the step above its start, less the student head's [V, d] gradient, divided by the size of one
chunk's [rows, V] float32 buffer, is the number of such buffers alive at the peak (later chunks: the head gradient
exists from the first chunk on). ``memory_plan.py`` uses the largest count. Usage:
``python benchmarks/chunk_buffers.py [--vocab 151936 --chunk-rows 110]`` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import format_table  # noqa: E402  (also puts this checkout's hf_kd first)
from meters import MemoryMeter  # noqa: E402  (peak resident memory of a step)


def live_buffers(
    term: str, vocab: int, chunk_rows: int, student_hidden: int = 576, teacher_hidden: int = 960
) -> float:
    """Buffers of [chunk_rows, vocab] float32 alive at the peak of a three-chunk fused step of ``term``."""
    import torch

    from hf_kd.losses import build_loss

    torch.manual_seed(0)
    head_s = torch.nn.Linear(student_hidden, vocab, bias=False)
    head_t = torch.nn.Linear(teacher_hidden, vocab, bias=False).requires_grad_(False)
    rows = 3 * chunk_rows
    h_s, h_t = torch.randn(1, rows, student_hidden) * 3, torch.randn(1, rows, teacher_hidden) * 4
    labels = torch.randint(0, vocab, (1, rows))
    loss = build_loss(term, chunk_size=chunk_rows)
    meter = MemoryMeter("cpu")
    for _ in range(2):  # the second step is measured (libraries loaded, caches warm)
        head_s.zero_grad(set_to_none=True)
        meter.start()
        loss.forward_fused(h_s.clone().requires_grad_(True), head_s, h_t, head_t, labels).backward()
    step_bytes = (meter.peak() - meter.baseline) * 2**20
    return (step_bytes - head_s.weight.numel() * 4) / (chunk_rows * vocab * 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-rows", type=int, default=110)
    parser.add_argument("--hidden", nargs=2, type=int, default=[576, 960], help="student and teacher hidden sizes")
    parser.add_argument("--terms", nargs="+", default=["fkl", "rkl", "jsd", "sfkl", "srkl", "akl", "bild", "dac_kl"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(f"{live_buffers(args.child, args.vocab, args.chunk_rows, *args.hidden):.1f}")
        return
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    rows = []
    for term in args.terms:  # one process per term: the peak of one term only
        shape = ["--vocab", str(args.vocab), "--chunk-rows", str(args.chunk_rows), "--hidden", *map(str, args.hidden)]
        command = [sys.executable, __file__, "--child", term, *shape]
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        rows.append([term, out.stdout.strip() or out.stderr.strip().splitlines()[-1]])
    print(format_table(["term", f"live [{args.chunk_rows}, {args.vocab}] float32 buffers"], rows), end="")


if __name__ == "__main__":
    main()
