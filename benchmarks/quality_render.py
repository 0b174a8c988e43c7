"""Rendering of the quality benchmark (benchmarks/quality.py): its results page (tables, plot, claims, findings)
written beside the JSON, and the methods section of the docs page that README links to."""

from __future__ import annotations

import json
import os
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import format_table, replace_readme_section, write_text_atomically  # noqa: E402
from quality_rows import METHODS  # noqa: E402
from quality_stats import (  # noqa: E402
    EQUAL_KL,
    EQUAL_ROUGE_L,
    RESAMPLES,
    Interval,
    compare_claims,
    finished,
    on_general_set,
    row_intervals,
)

FINDINGS_HEADING = "Findings (commentary on this run, written after it)"  # the results page's and docs page's


def _interval(values: Interval | None, spec: str) -> str:
    if values is None:
        return "-"
    point, low, high = values
    return f"{format(point, spec)} [{format(low, spec)}, {format(high, spec)}]"


def _mean(records: list[dict[str, Any]], key: str, spec: str) -> str:
    values = [r[key] for r in records if key in r]
    return format(statistics.mean(values), spec) if values else "-"


def markdown_table(results: list[dict[str, Any]], order: list[str], intervals: dict[str, dict]) -> str:
    """One row per method: point estimates with their 95% bootstrap ``intervals`` (:func:`row_intervals`)."""
    head = ["method", "recipe", "teacher", "lmbda", "seeds", "Rouge-L [95% CI]", "KL(teacher‖student) [95% CI]"]
    head += ["first-sentence EM %", "loops %", "answer words", "answers < 10 words %", "train s / run"]
    rows = []
    for name in order:
        records = [r for r in results if r["method"] == name]
        if not records:
            continue
        ok = finished(results, name)
        method = METHODS.get(name)
        cells = [name, method.recipe if method else "?"]
        if not ok:
            cells += [f"error: {records[-1].get('error', 'no per-prompt scores')}"] + ["-"] * (len(head) - 3)
        else:
            trained = method is None or method.trainer is not None
            source = "cache" if ok[0].get("teacher_cache") else ("live" if trained else "-")
            cells += [
                source,
                f"{ok[0]['lmbda']:g}" if trained else "-",
                str(len(ok)),
                _interval(intervals[name]["rouge_l"], ".2f"),
                _interval(intervals[name]["kl"], ".3f"),
                _mean(ok, "exact_match", ".1f"),
                _mean(ok, "loop_rate", ".1f"),
                _mean(ok, "answer_words" if "answer_words" in ok[0] else "mean_answer_words", ".1f"),  # older JSON
                _mean(ok, "short_answer_rate", ".1f"),
                _mean(ok, "train_s", ".0f"),
            ]
        rows.append(cells)
    return format_table(head, rows)


def claims_table(results: list[dict[str, Any]]) -> str:
    """Each claim as the paired-bootstrap difference (row - baseline) of Rouge-L and of KL, and its verdict
    (quality_stats.verdict)."""
    head = ["claim", "rows", "Rouge-L difference [95% CI]", "KL difference [95% CI]", "here"]
    rows = [
        [
            c.claim,
            f"{c.row} - {c.baseline} ({c.seeds[0]} vs {c.seeds[1]} seeds)",
            _interval(c.rouge_l, "+.2f"),
            _interval(c.kl, "+.3f"),
            c.verdict,
        ]
        for c in compare_claims(results)
    ]
    return format_table(head, rows)


def plot_methods(intervals: dict[str, dict], path: Path) -> Path | None:
    """Rouge-L and KL per row with their 95% ``intervals`` (:func:`row_intervals`), one panel each (PNG); None when
    nothing finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(intervals)
    if not names:
        return None
    fig, panels = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5), sharey=True)
    for panel, metric, label in zip(panels, ("rouge_l", "kl"), ("Rouge-L (higher is better)", "KL(teacher‖student)")):
        ys, points, errors = [], [], [[], []]
        for y, name in enumerate(names):
            values = intervals[name][metric]
            if values is None:
                continue
            point, low, high = values
            ys.append(y)
            points.append(point)
            errors[0].append(point - low)
            errors[1].append(high - point)
        panel.errorbar(points, ys, xerr=errors, fmt="o", capsize=3)
        panel.set_xlabel(label + ", 95% bootstrap CI")
        panel.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(range(len(names)), names)
    panels[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_markdown(payload: dict[str, Any], intervals: dict[str, dict], figure: str | None = None) -> str:
    """The whole results page: command, budget, machine, conditions, the tables and any commentary."""
    budget = payload["budget"]
    env = payload["environment"]
    results = payload["results"]
    done = [r for r in results if "error" not in r]
    eval_n = next((r["num_samples"] for r in done), None)
    cpu_s = sum(r.get("train_cpu_s", 0.0) + r.get("eval_cpu_s", 0.0) for r in done)
    train_n = next((r["train_examples"] for r in done if "train_examples" in r), None)
    machine = (
        f"{env.get('gpu') or env['cpu']}, {env['cpu_count']} CPU cores, {payload['threads'] or 'default'} threads; "
        f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}"
    )
    cache = budget.get("cache_top_k")
    lines = [
        f"# Distillation quality, `{payload['budget_name']}` budget",
        "",
        "Generated by `benchmarks/quality.py` from `" + payload["json_name"] + "`; every number is measured.",
        "",
        "- Command: " + "; ".join(f"`{c}`" for c in payload["commands"]),
        f"- Machine: {machine}",
        f"- Budget: {budget['steps']} steps, batch {budget['batch']}, learning rate {budget['learning_rate']:g} "
        f"(cosine, {max(1, budget['steps'] // 10)} warm-up steps), max_length {budget['max_length']}, "
        f"{budget['max_new_tokens']} new tokens (evaluation and on-policy generation), seeds "
        f"{sorted({r['seed'] for r in done}) or '-'} of {budget['seeds']} planned; identical for every row.",
        f"- On-policy share: lmbda = {budget['lmbda']:g} for the distillation rows, "
        f"{budget.get('onpolicy_lmbda', 0.5):g} for on-policy GKD, {budget['mgsr_lmbda']:g} for MGSR (SCRG corrects "
        "student generations), 0 for SFT.",
        f"- Teacher: rows marked `cache` train from the offline top-{cache} teacher cache of the training data "
        "(no teacher forward per step; built once), `live` rows run the teacher at every step."
        if cache
        else "- Teacher: every row runs the live teacher.",
        f"- Pair: SmolLM2-135M-Instruct teacher, student = {budget['student_layers']} of its 30 decoder layers "
        f"({budget.get('layer_selection', 'even')} selection, embeddings and head copied); dskd-cma trains the "
        "same student from Gemma-3-270m (vocabulary 262144 vs 49152).",
        f"- Data: {train_n if train_n is not None else '?'} bundled training conversations; "
        f"{eval_n if eval_n is not None else '?'} held-out conversations, evenly spread over the held-out file "
        "(all its sources), are scored. The references are greedy answers of the SmolLM2 teacher (at most 96 "
        "tokens), so its own row is near the ceiling but below 100 (shorter generation budget, trimmed references).",
        "- Metrics: Rouge-L F1 x 100 of greedy answers vs references; KL(SmolLM2 teacher ‖ student) per reference "
        "answer token in nats (the SmolLM2 teacher for every row, dskd-cma's student included; teacher rows: not "
        "applicable); first-sentence exact match; loops: answers caught in a repetition loop "
        "(`hf_kd.evaluation.has_repetition_loop`); answer words: mean words per greedy answer. Point estimates "
        f"are means over seeds; intervals are 95% percentile bootstraps ({RESAMPLES} resamples) over held-out "
        "prompts and seeds. Each record in the JSON keeps every greedy answer and per-prompt score.",
        f"- Time: {payload.get('wall_s', 0) / 60:.1f} min of wall time for the runs in this file (subprocesses, "
        f"model loading and evaluation included); training and evaluation used {cpu_s / 60:.1f} min of process CPU "
        "time. `train s / run` is training alone, mean over seeds. The cores were shared with other work, so wall "
        "times are indicative; the quality numbers do not depend on it.",
        "",
        markdown_table(results, payload["methods"], intervals),
    ]
    if figure:
        lines += [f"![Rouge-L and KL per method, 95% intervals]({figure})", ""]
    claims = claims_table(results)
    if claims.count("\n") > 2:
        lines += [
            "## The papers' claims here",
            "",
            "Paired bootstrap of the difference (row - baseline) over the same prompts; `reproduces`: better on at "
            "least one metric with an interval that excludes 0 and worse on none; `cannot tell`: both intervals "
            f"contain 0 (this budget cannot separate the two rows); an interval inside ±{EQUAL_ROUGE_L} Rouge-L or "
            f"±{EQUAL_KL} nats counts as 0.",
            "",
            claims,
        ]
    general = on_general_set(results)
    if any("error" not in r for r in general):
        general_n = next(r["num_samples"] for r in general if "error" not in r)
        lines += [
            "## General-assistant held-out set",
            "",
            f"The same students on {general_n} prompts of `heldout_general` (everyday questions from sources the "
            "training data never draws from: short facts, explanations, lists, rewriting, simple maths, code, "
            "creative writing), evenly spread over the file; the same metrics and claims.",
            "",
            markdown_table(general, payload["methods"], row_intervals(general, payload["methods"])),
            "",
        ]
        general_claims = claims_table(general)
        lines += [general_claims, ""] if general_claims.count("\n") > 2 else []
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["Failed runs:", ""] + [f"- {r['method']} seed {r['seed']}: {r['error']}" for r in failed] + [""]
    if payload.get("commentary"):
        lines += [f"## {FINDINGS_HEADING}", "", payload["commentary"].strip(), ""]
    return "\n".join(lines)


def write_outputs(payload: dict[str, Any], json_path: Path) -> str:
    """Writes the JSON (the record of truth), the plot and the markdown page rendered from them; returns the page."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload["json_name"] = json_path.name
    write_text_atomically(json_path, json.dumps(payload, indent=2) + "\n")
    intervals = row_intervals(payload["results"], payload["methods"])
    figure = plot_methods(intervals, json_path.with_suffix(".png"))
    page = render_markdown(payload, intervals, figure.name if figure else None)
    json_path.with_suffix(".md").write_text(page)
    return page


SECTION_HEADING = "# Methods side by side"  # of docs/results/methods.md, the page --readme rewrites


def update_section(readme: Path, payload: dict[str, Any], page: str, json_path: Path) -> None:
    """Rewrites the methods section of ``readme`` (docs/results/methods.md: from its heading to the next heading of
    its level) from the results page: what was run, the table, the plot, the claims and the commentary."""
    budget = payload["budget"]
    table = page[page.index("| method | recipe |") :].split("\n\n")[0]
    claims = page[page.index("| claim | rows |") :].split("\n\n")[0] if "| claim | rows |" in page else ""
    link = Path(os.path.relpath(json_path.resolve(), readme.parent.resolve()))
    trained = [name for name in payload["methods"] if name in METHODS and METHODS[name].trainer is not None]
    missing = any(len(finished(payload["results"], name)) < budget["seeds"] for name in trained)
    seeds = f"{budget['seeds']} seeds per trained row" + (
        " are planned; rows or seeds still missing are filled in by later `--resume` runs." if missing else "."
    )
    intro = (
        f"[{json_path.with_suffix('.md')}]({link.with_suffix('.md')}), regenerated by "
        f"`python benchmarks/quality.py --budget {payload['budget_name']}` (resumable: `--resume`, `--max-runs N`; "
        f"this section: `--render {json_path} --readme {readme}`). The demo's student (the "
        f"{budget['student_layers']} SmolLM2-135M-Instruct layers of highest block influence) trained by every "
        f"method with the same steps, batch, schedule and seeds: {budget['steps']} steps, batch {budget['batch']}, "
        f"lr {budget['learning_rate']:g} cosine, max_length {budget['max_length']}; {budget['eval_samples']} "
        f"held-out prompts, {budget['max_new_tokens']} new tokens, greedy. Rows marked `cache` train from the "
        f"offline teacher cache (top-{budget['cache_top_k']} unless the recipe says otherwise), `live` rows run the "
        "teacher at every step. Intervals: 95% bootstrap over prompts and seeds; every answer and per-prompt score "
        f"is kept in the JSON. {seeds}"
    )
    section = [SECTION_HEADING, "", textwrap.fill(intro, 116, break_on_hyphens=False), "", table, ""]
    section += [f"![Rouge-L and KL per method, 95% intervals]({link.with_suffix('.png')})", ""]
    if claims:
        section += [
            "The papers' claims, as paired bootstraps of the difference (row - baseline) over the same prompts;",
            f"`cannot tell`: both intervals contain 0 (or lie inside ±{EQUAL_ROUGE_L} Rouge-L, ±{EQUAL_KL} nats).",
            "",
            claims,
            "",
        ]
    if payload.get("commentary"):
        section += [f"## {FINDINGS_HEADING}", "", payload["commentary"].strip(), ""]
    replace_readme_section(readme, SECTION_HEADING, section)
