"""AKL's cost against JSD's on the loss side, on peaked and on flat teachers.

AKL splits each teacher row into a head (the largest entries holding ``mu`` of the mass) and a tail; on a flat
teacher the head spans much of the vocabulary, so how the split is found decides whether AKL costs what JSD costs.
This script times ``jsd`` and ``akl`` with ``loss_side.py``'s step (384 response rows, the student head
forward and backward, the teacher head forward and the divergence, fp32, each configuration in a fresh process)
with the teacher's hidden states scaled by 6 (peaked: about half the mass in the top 64 entries, as in a trained
LM) or by 1 (flat: a random-weight head's near-uniform rows). Rounds interleave every (checkout, vocabulary, teacher,
method), so a load change on a shared machine hits all alike; the akl/jsd ratio is taken within each round (CPU
time) and its median reported.

``--checkout NAME=PATH`` times the hf_kd of another checkout too (its own ``benchmarks/speed_memory.py`` runs the
step), e.g. the commit before a change against this one::

    python benchmarks/akl_split.py --checkout before-COMMIT=PATH --checkout after-COMMIT=. --rounds 3 --steps 1

Results: ``benchmarks/results/akl_split.{json,md}``; ``--render`` rewrites the page from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR, environment, format_table, run_in_fresh_process, write_text_atomically  # noqa: E402
from loss_side import LossSideSpec, _loss_side_inputs  # noqa: E402

TEACHERS = {"peaked": 6.0, "flat": 1.0}  # LossSideSpec.teacher_scale
METHODS = ("jsd", "akl")


def head_fraction(vocab: int, scale: float, mu: float = 0.5, rows: int = 16) -> float:
    """Median fraction of the vocabulary in AKL's head (entries holding ``mu`` of the mass) over the benchmark
    teacher's first ``rows`` rows: how flat the teacher is."""
    import torch

    _, head_t, _, h_t, _ = _loss_side_inputs(LossSideSpec(method="akl", vocab=vocab, rows=rows, teacher_scale=scale))
    with torch.no_grad():
        p = head_t(h_t).softmax(-1).sort(-1, descending=True).values
    return float(((p.cumsum(-1) <= mu).sum(-1).clamp_min(1).float() / vocab).median())


def command(argv: list[str]) -> str:
    """The command line, with each checkout's path left out (it names the machine, not the measurement)."""
    words = [word.split("=", 1)[0] + "=<path>" if "=" in word and not word.startswith("-") else word for word in argv]
    return " ".join(["python", "benchmarks/akl_split.py", *words])


def run(args: argparse.Namespace) -> dict[str, Any]:
    checkouts = dict(item.split("=", 1) for item in args.checkout or [f"this={Path(__file__).resolve().parents[1]}"])
    fractions = {f"{v} {t}": head_fraction(v, s) for v in args.vocabs for t, s in TEACHERS.items()}
    records: list[dict[str, Any]] = []
    payload: dict[str, Any] = {}
    for round_index in range(args.rounds):
        for name, root in checkouts.items():
            script = Path(root).resolve() / "benchmarks" / "speed_memory.py"
            for vocab in args.vocabs:
                for teacher, scale in TEACHERS.items():
                    for method in METHODS:
                        spec = LossSideSpec(
                            method=method,
                            vocab=vocab,
                            rows=args.rows,
                            warmup=1,
                            steps=args.steps,
                            threads=args.threads,
                            teacher_scale=scale,
                        )
                        started = time.perf_counter()
                        record = run_in_fresh_process(script, spec, spec.threads, args.timeout)
                        record |= {"round": round_index, "checkout": name, "teacher": teacher, "method": method}
                        record |= {"vocab": vocab, "spec": dataclasses.asdict(spec)}
                        records.append(record)
                        status = record.get("error") or f"cpu {record['cpu_times_s']}"
                        elapsed = time.perf_counter() - started
                        print(f"[{elapsed:4.0f} s] round {round_index} {name} {vocab} {teacher} {method}: {status}")
                        sys.stdout.flush()
                        payload = {
                            "command": command(sys.argv[1:]),
                            "threads": args.threads,
                            "checkouts": list(checkouts),
                            "environment": environment(),
                            "head_fraction": fractions,
                            "records": records,
                        }
                        write_text_atomically(args.out, json.dumps(payload, indent=2) + "\n")
    return payload


def summary(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (checkout, vocabulary, teacher): median CPU seconds of each method and the median over rounds of the
    within-round akl/jsd CPU-time ratio, with its range."""
    times: dict[tuple, dict[str, list[float]]] = {}
    for r in payload["records"]:
        if "cpu_times_s" in r:
            key = (r["checkout"], r["vocab"], r["teacher"], r["round"])
            times.setdefault(key, {}).setdefault(r["method"], []).extend(r["cpu_times_s"])
    rows: dict[tuple, dict[str, Any]] = {}
    for (checkout, vocab, teacher, _), methods in times.items():
        row = rows.setdefault((checkout, vocab, teacher), {"jsd": [], "akl": [], "ratios": []})
        for method, values in methods.items():
            row[method].append(statistics.median(values))
        if all(m in methods for m in METHODS):
            row["ratios"].append(statistics.median(methods["akl"]) / statistics.median(methods["jsd"]))
    out = []
    for (checkout, vocab, teacher), row in rows.items():
        ratios = row["ratios"]
        out.append(
            {
                "checkout": checkout,
                "vocab": vocab,
                "teacher": teacher,
                "head_fraction": payload["head_fraction"].get(f"{vocab} {teacher}"),
                "jsd_cpu_s": statistics.median(row["jsd"]) if row["jsd"] else None,
                "akl_cpu_s": statistics.median(row["akl"]) if row["akl"] else None,
                "akl_x_jsd": statistics.median(ratios) if ratios else None,
                "akl_x_jsd_range": [min(ratios), max(ratios)] if ratios else None,
                "rounds": len(ratios),
            }
        )
    return out


def page(payload: dict[str, Any]) -> str:
    head = ["checkout", "vocab", "teacher", "head/V", "jsd CPU s", "akl CPU s", "akl ×jsd", "range", "rounds"]
    rows = []
    for s in summary(payload):
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        low_high = s["akl_x_jsd_range"]
        rows.append(
            [
                s["checkout"],
                str(s["vocab"]),
                s["teacher"],
                fmt(s["head_fraction"], ".4f"),
                fmt(s["jsd_cpu_s"], ".2f"),
                fmt(s["akl_cpu_s"], ".2f"),
                fmt(s["akl_x_jsd"], ".2f"),
                f"{low_high[0]:.2f}-{low_high[1]:.2f}" if low_high else "-",
                str(s["rounds"]),
            ]
        )
    return format_table(head, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", help="NAME=PATH of an hf_kd checkout to time (repeatable)")
    parser.add_argument("--vocabs", nargs="+", type=int, default=[151936, 262144])
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--steps", type=int, default=2, help="measured steps per configuration (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "akl_split.json")
    parser.add_argument("--render", action="store_true", help="only rewrite the page from --out")
    args = parser.parse_args(argv)
    payload = json.loads(args.out.read_text()) if args.render else run(args)
    table = page(payload)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
