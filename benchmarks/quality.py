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

This file is the command line: ``quality_rows.py`` says what runs (budgets, rows, the spec of one run),
``quality_runs.py`` runs one row and seed in a fresh process, ``quality_stats.py`` holds the bootstraps and the
claims' verdicts, ``quality_render.py`` the results page, plot and docs section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR, environment  # noqa: E402  (offline defaults, this checkout's hf_kd)
from quality_render import update_section, write_outputs  # noqa: E402
from quality_rows import BUDGETS, METHODS, Budget, RunSpec  # noqa: E402
from quality_runs import run_child, run_in_subprocess  # noqa: E402

from hf_kd.data import BUNDLED_SPLITS, bundled_split_digest  # noqa: E402


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


def bundled_data_digest() -> dict[str, str]:
    """A short SHA-256 of each bundled split, stored with the results so that --resume never mixes data versions."""
    return {split: bundled_split_digest(split)[:16] for split in BUNDLED_SPLITS}


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
        "data": bundled_data_digest(),
        "methods": list(METHODS),
        "commands": [command],
        "wall_s": 0.0,
        "results": [],
    }
    if args.resume and json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous["budget"] != payload["budget"]:
            raise SystemExit(f"{json_path} was made with another budget; drop --resume or pass --out.")
        if previous.get("data") != payload["data"]:
            raise SystemExit(f"{json_path} was made on other bundled data; drop --resume or pass --out.")
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
