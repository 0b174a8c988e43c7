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

``--render results/speed_memory_<tag>.json`` rewrites the markdown table of either benchmark's results.

This file is the command line: ``trainer_steps.py`` and ``loss_side.py`` hold the two benchmarks, ``meters.py`` (a
fresh process per configuration, step timing, peak memory) and ``shapes.py`` (random models of real shapes) what
they share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR, write_text_atomically  # noqa: E402  (offline defaults, this checkout's hf_kd)
from loss_side import LOSS_SIDE_METHODS, LossSideSpec, loss_side_table, run_loss_side, run_loss_side_rounds  # noqa: E402
from meters import run_in_subprocess  # noqa: E402
from trainer_steps import (  # noqa: E402
    ALL_METHODS,
    DEFAULT_PEAK_TFLOPS,
    PRESETS,
    RunSpec,
    add_ratios,
    build_specs,
    markdown_table,
    overhead_basis,
    run_config,
    write_results,
)


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


def render(results_json: Path) -> str:
    """Rewrites the markdown table of a results JSON (either benchmark's) from its records; returns the table."""
    payload = json.loads(results_json.read_text())
    if payload.get("mode") == "loss-side":  # records already merged over the rounds, with their ratios
        table = loss_side_table(payload["results"], payload.get("peak_tflops"))
    else:
        add_ratios(payload["results"], overhead_basis(payload["device"]))
        table = markdown_table(payload["results"], cuda=payload["device"] == "cuda")
        write_text_atomically(results_json, json.dumps(payload, indent=2) + "\n")
    results_json.with_suffix(".md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child = json.loads(args.child)  # a LossSideSpec has "rows", a RunSpec "seq"
        result = run_loss_side(LossSideSpec(**child)) if "rows" in child else run_config(RunSpec.from_dict(child))
        Path(args.child_out).write_text(json.dumps(result))
        return
    if args.render:
        print(render(args.render))
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


if __name__ == "__main__":
    main()
