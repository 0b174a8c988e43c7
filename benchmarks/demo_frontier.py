"""What `hf-kd demo` reaches in how many minutes: the demo at several step budgets, each run a fresh process on
the same threads, its held-out Rouge-L, repetition loops and KL against its wall time.

    python benchmarks/demo_frontier.py --steps 40 80 120 --threads 2      # results/demo/frontier_cpu.{json,md,png}
    python benchmarks/demo_frontier.py --resume --steps 160               # add a point, keep the others
    python benchmarks/demo_frontier.py --resume --steps 80 --seeds 3      # seeds 1 and 2 of the 80-step point
    python benchmarks/demo_frontier.py --render benchmarks/results/demo/frontier_cpu.json --readme README.md

Other demo flags pass through after `--` (`-- --kd_loss fkl`); they are part of a point's identity. The first run
of a step budget builds its teacher cache (of the conversations that budget trains on; later runs reuse it), so
each point records the seconds its run spent building it and the wall time without them. A row with several seeds
shows their mean and, in brackets, the lowest and highest seed. The run at the demo's default steps and seed 0 is
also copied to `results/demo/` (its table, answers, training curves), and `--readme` rewrites README's
"### Demo results" section (that table and the curves) and the frontier section of docs/results/demo.md (`--page`:
this table, its plot and the commentary) from these files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, environment, format_table, replace_readme_section, write_text_atomically  # noqa: E402  (offline defaults, shared with the other benchmarks)

RESULTS = ROOT / "benchmarks" / "results" / "demo"
README_SECTION = "### Demo results"
PAGE = ROOT / "docs" / "results" / "demo.md"
PAGE_SECTION = "# What `hf-kd demo` reaches in how many minutes"  # of PAGE: the frontier and its commentary
ROUGE_L_BAR, MINUTES_BAR = 30.0, 15.0  # the targets the demo is measured against


def run_point(steps: int, seed: int, extra: list[str], threads: int, keep: Path | None) -> dict[str, Any]:
    """One `hf-kd demo --max_steps steps --seed seed` in a fresh process; its demo_results.json plus the cache build
    time. The run's output folder is copied to ``keep`` when given."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as cwd:  # the run writes to the demo's default outputs/demo, under cwd
        out = Path(cwd) / "outputs" / "demo"
        argv = ["demo", "--max_steps", str(steps), "--seed", str(seed), "--output_dir", "outputs/demo", *extra]
        code = f"import sys; from hf_kd.cli import main; sys.exit(main({argv!r}))"
        command = [sys.executable, "-c", code]
        proc = subprocess.run(command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise SystemExit(f"hf-kd demo --max_steps {steps} --seed {seed} failed (exit {proc.returncode}): {tail}")
        record = json.loads((out / "demo_results.json").read_text())
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("demo_results.json", "demo_results.md", "training_curves.png"):
                shutil.copy(out / name, keep / name)
    return point_record(steps, seed, extra, threads, record)


def point_record(steps: int, seed: int, extra: list[str], threads: int, record: dict[str, Any]) -> dict[str, Any]:
    """A point of the frontier from a demo run's demo_results.json: its results on every held-out set it scored,
    its wall time and the seconds it spent building the teacher cache."""
    starts = record["stage_starts_s"]
    cache_s = starts["evaluate_before"] - starts["teacher"]
    point = {
        "steps": steps,
        "seed": seed,
        "extra": extra,
        "threads": threads,
        "wall_s": record["wall_s"],
        "teacher_cache_s": round(cache_s, 1),
        "stage_starts_s": starts,
        "settings": record["settings"],
        "results": record["results"],
    }
    return point | ({"results_general": record["results_general"]} if "results_general" in record else {})


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def cache_build_s(group: list[dict[str, Any]]) -> float:
    """Seconds the run that built a step budget's teacher cache spent on it (0 when every run found it built):
    each budget caches the conversations it trains on (hf_kd.demo.training_data)."""
    return max(p["teacher_cache_s"] for p in group)


def _warm_s(point: dict[str, Any]) -> float:
    """The run's wall time without building the teacher cache (what every run after the first takes)."""
    return point["wall_s"] - point["teacher_cache_s"]


def _seed(point: dict[str, Any]) -> int:
    return point.get("seed", point["settings"].get("seed", 0))


def by_steps(points: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The points grouped by step budget (one per seed), in order of steps."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for p in sorted(points, key=lambda p: (p["steps"], _seed(p))):
        groups.setdefault(p["steps"], []).append(p)
    return groups


def _after(group: list[dict[str, Any]], metric: str) -> list[float]:
    return [p["results"]["student after"][metric] for p in group]


def repeated_run_pct(predictions: list[str]) -> float:
    """Share of answers that say a run of 6+ words twice in a row (hf_kd.evaluation.repeats_a_run), in %."""
    from hf_kd.evaluation import repeats_a_run

    return 100.0 * sum(map(repeats_a_run, predictions)) / len(predictions)


def _spread(values: list[float], digits: int) -> str:
    """The mean, and with several seeds the lowest and highest in brackets."""
    mean = f"{sum(values) / len(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def _general(group: list[dict[str, Any]], metric: str, model: str = "student after") -> list[float]:
    return [p["results_general"][model][metric] for p in group]


def markdown_table(points: list[dict[str, Any]]) -> str:
    """One row per step budget; with the general-assistant held-out set scored in every point (the demo's
    ``general_eval``), its Rouge-L, loops and answer length (the teacher's in brackets) too."""
    general = all("results_general" in p for p in points)
    head = ["steps", "seeds", "minutes, cache built", "minutes to build the cache", "minutes, first run", "Rouge-L"]
    head += ["first-sentence EM %", "loops %", "repeats a 6+ word run %", "held-out KL"]
    if general:
        head += [
            "general Rouge-L",
            "general loops %",
            "general answer words (teacher)",
            "general answers < 10 words %",
        ]
    rows = []
    for steps, group in by_steps(points).items():
        warm, build = sum(_warm_s(p) for p in group) / len(group), cache_build_s(group)
        repeats = [repeated_run_pct(p["results"]["student after"]["predictions"]) for p in group]
        cells = [
            str(steps),
            ", ".join(str(_seed(p)) for p in group),
            _minutes(warm),
            _minutes(build),
            _minutes(warm + build),
            _spread(_after(group, "rouge_l"), 2),
            _spread(_after(group, "exact_match"), 1),
            _spread(_after(group, "loop_rate"), 1),
            _spread(repeats, 1),
            _spread(_after(group, "kl"), 3),
        ]
        if general:
            teacher_words = _spread(_general(group, "answer_words", "teacher"), 1)
            cells += [
                _spread(_general(group, "rouge_l"), 2),
                _spread(_general(group, "loop_rate"), 1),
                f"{_spread(_general(group, 'answer_words'), 1)} ({teacher_words})",
                _spread(_general(group, "short_answer_rate"), 1),
            ]
        rows.append(cells)
    return format_table(head, rows).rstrip("\n")


def plot_frontier(points: list[dict[str, Any]], path: Path) -> Path:
    """Rouge-L against wall minutes, with and without the teacher-cache build; the targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(by_steps(points).values())
    rouge = [_after(g, "rouge_l") for g in groups]
    mean = [sum(r) / len(r) for r in rouge]
    spread = [[m - min(r) for m, r in zip(mean, rouge)], [max(r) - m for m, r in zip(mean, rouge)]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    warm = [sum(_warm_s(p) for p in g) / len(g) / 60 for g in groups]
    first = [minutes + cache_build_s(g) / 60 for minutes, g in zip(warm, groups)]
    ax.errorbar(warm, mean, yerr=spread, fmt="o-", capsize=3, label="teacher cache already built (seed range)")
    ax.plot(first, mean, "s--", alpha=0.6, label="first run (builds the cache)")
    for x, y, g in zip(warm, mean, groups):
        loops = sum(_after(g, "loop_rate")) / len(g)
        ax.annotate(f"{g[0]['steps']} steps, loops {loops:.0f}%", (x, y), fontsize=8, textcoords="offset points",
                    xytext=(4, -10))  # fmt: skip
    ax.axhline(ROUGE_L_BAR, color="grey", linestyle=":", linewidth=1)
    ax.axvline(MINUTES_BAR, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"wall minutes, `hf-kd demo` on {points[0]['threads']} CPU threads")
    ax.set_ylabel("held-out Rouge-L vs the teacher's answers")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(payload: dict[str, Any], json_path: Path) -> str:
    """The markdown page (table and plot) beside the JSON; returns its text."""
    plot = plot_frontier(payload["points"], json_path.with_suffix(".png"))
    env = payload["environment"]
    page = "\n\n".join(
        [
            "# `hf-kd demo`: quality against time",
            f"Regenerated by `python benchmarks/demo_frontier.py` (torch {env['torch']}, {env['cpu_count']} CPUs "
            f"on the machine, {payload['points'][0]['threads']} threads per run). Each row is one run "
            "(or, with several seeds, the mean of the runs) of the demo with that many optimizer steps and its other "
            "defaults"
            + (f" plus `{' '.join(payload['points'][0]['extra'])}`" if payload["points"][0]["extra"] else "")
            + "; Rouge-L, first-sentence exact match and repetition loops are over the demo's held-out prompts "
            "(greedy), KL is KL(teacher || student) per answer token.",
            markdown_table(payload["points"]),
            f"![Rouge-L against minutes]({plot.name})",
        ]
    )
    json_path.with_suffix(".md").write_text(page + "\n")
    return page


def _link(target: Path, page: Path) -> Path:
    """``target`` as a link from ``page``'s folder."""
    return Path(os.path.relpath(target.resolve(), page.parent.resolve()))


def update_readme(readme: Path, payload: dict[str, Any], json_path: Path, page: Path) -> None:
    """Rewrites README's demo section (its heading to the next of its level): the default run's table and training
    curves, and a link to the docs ``page`` that holds the frontier and its commentary."""
    default = json.loads((json_path.parent / "demo_results.json").read_text())
    settings = default["settings"]
    rel = _link(json_path.parent, readme)
    intro = (
        f"`hf-kd demo` with its defaults (`{settings['kd_loss']}`, {settings['max_steps']} steps, batch "
        f"{settings['batch_size']}, lr {settings['learning_rate']:g} cosine, max_length {settings['max_length']}, "
        f"student = {len(default['student_layers'])} of SmolLM2-135M-Instruct's 30 layers by block influence, "
        f"top-{settings['cache_top_k']} teacher cache"
        + (", training answers that loop left out" if settings.get("drop_looping_answers") else "")
        + (", batches of similar length" if settings.get("group_by_length") else "")
        + f"; {settings['eval_samples']} held-out prompts, "
        f"{settings['max_new_tokens']} new tokens, greedy), one run, seed {settings['seed']}, "
        f"{default['wall_s'] / 60:.1f} min wall ([{rel}/demo_results.json]({rel}/demo_results.json), every answer "
        "kept). It prints three before/after answers side by side and writes this table, the training curves and "
        "the student's model card (which shows both) beside the student:"
    )
    table = (json_path.parent / "demo_results.md").read_text().split("\n\n")[0]
    section = [README_SECTION, "", textwrap.fill(intro, 116, break_on_hyphens=False), "", table, ""]
    section += [f"![demo training curves]({rel}/training_curves.png)", ""]
    more = (
        "What the demo reaches in how many minutes (step budgets and seeds), what its answers look like and how its "
        f"defaults were chosen: [{_link(page, readme)}]({_link(page, readme)})."
    )
    section += [textwrap.fill(more, 116, break_on_hyphens=False), ""]
    replace_readme_section(readme, README_SECTION, section)


def _in_repository(path: Path) -> Path:
    """``path`` as written from the repository's root (the page names no folder of the machine it was made on)."""
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


def update_page(page: Path, payload: dict[str, Any], json_path: Path, readme: Path) -> None:
    """Rewrites the docs page's frontier section (its heading to the next of its level): the frontier table and
    plot, and the commentary stored in the JSON; the default run's table stays in ``readme``."""
    rel = _link(json_path.parent, page)
    shown = _in_repository(json_path)
    intro = (
        f"[{shown.with_suffix('.md')}]({rel}/{json_path.stem}.md), regenerated by "
        f"`python benchmarks/demo_frontier.py` (this page: `--render {shown} --readme {_in_repository(readme)}`); the "
        "default "
        f"run's table and training curves: [{readme.name}, Demo results]({_link(readme, page)}#demo-results)."
    )
    section = [
        PAGE_SECTION,
        "",
        textwrap.fill(intro, 116, break_on_hyphens=False),
        "",
        markdown_table(payload["points"]),
        "",
        f"![Rouge-L against minutes]({rel}/{json_path.stem}.png)",
        "",
    ]
    if payload.get("commentary"):
        section += [payload["commentary"].strip(), ""]
    replace_readme_section(page, PAGE_SECTION, section)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 80, 120], help="optimizer steps per point")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of each step budget")
    parser.add_argument("--threads", type=int, default=2, help="torch/OMP threads of each run")
    parser.add_argument("--out", type=Path, default=RESULTS / "frontier_cpu.json", help="results JSON")
    parser.add_argument("--resume", action="store_true", help="keep the JSON's points, run only missing steps")
    parser.add_argument(
        "--rebuild-cache", action="store_true", help="delete the demo cache first (its build is measured)"
    )
    parser.add_argument("--render", type=Path, help="only rewrite the page (and --readme) of this results JSON")
    parser.add_argument("--commentary", type=Path, help="with --render: store this text as the findings")
    parser.add_argument("--readme", type=Path, help="also rewrite this README's demo section and --page")
    parser.add_argument("--page", type=Path, default=PAGE, help="the docs page of the frontier and its commentary")
    parser.add_argument("demo_flags", nargs=argparse.REMAINDER, help="after --: flags passed to every demo run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from hf_kd.data import load_bundled_dataset
    from hf_kd.demo import STUDENT_SOURCE, DemoSettings, bundled_cache_folder, training_data

    args = parse_args(argv)
    extra = [flag for flag in args.demo_flags if flag != "--"]
    if args.render:
        payload = json.loads(args.render.read_text())
        if args.commentary:
            payload["commentary"] = args.commentary.read_text()
            write_text_atomically(args.render, json.dumps(payload, indent=1) + "\n")
        json_path = args.render
    else:
        json_path = args.out
        payload = json.loads(json_path.read_text()) if args.resume and json_path.exists() else {"points": []}
        payload["environment"] = environment()
        defaults = {f.name: f.default for f in fields(DemoSettings)}
        default_steps = defaults["max_steps"]
        if args.rebuild_cache:  # each step budget's own cache (the conversations it trains on)
            bundled = load_bundled_dataset("train")
            for steps in args.steps:
                _, name = training_data(bundled, DemoSettings(max_steps=steps))
                shutil.rmtree(bundled_cache_folder(STUDENT_SOURCE, name, defaults["cache_top_k"]), True)
        done = {(p["steps"], _seed(p), tuple(p["extra"])) for p in payload["points"]}
        for steps, seed in [(steps, seed) for seed in range(args.seeds) for steps in args.steps]:
            if (steps, seed, tuple(extra)) in done:
                continue
            keep = json_path.parent if steps == default_steps and seed == 0 and not extra else None
            point = run_point(steps, seed, extra, args.threads, keep)
            after = point["results"]["student after"]
            print(
                f"{steps} steps, seed {seed}: {point['wall_s']:.0f} s, Rouge-L {after['rouge_l']:.2f}, "
                f"loops {after['loop_rate']}%"
            )
            payload["points"].append(point)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(json_path, json.dumps(payload, indent=1) + "\n")
    print(render(payload, json_path))
    if args.readme:
        update_readme(args.readme, payload, json_path, args.page)
        update_page(args.page, payload, json_path, args.readme)


if __name__ == "__main__":
    main()
