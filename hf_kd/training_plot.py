"""Training curves of a distillation run as a PNG: every logged loss term, and the held-out KL and Rouge-L."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .atomic import write_atomically


def curves(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` for the training loss, each ``loss/<term>`` and the ``eval/*`` metrics."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if key == "loss" or key.startswith("loss/") or key in ("eval/kl", "eval/rouge_l"):
                series.setdefault(key, []).append((int(step), float(value)))
    return series


def plot_training_curves(log_history: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Two panels: the loss terms over optimizer steps (log scale), and the held-out KL and Rouge-L over steps.

    ``log_history`` is ``trainer.state.log_history`` (train logs carry ``loss/<term>``; an
    :class:`~hf_kd.evaluation.EvaluationCallback` adds ``eval/kl`` and ``eval/rouge_l``). Returns the PNG's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = curves(log_history)
    if not series:
        raise ValueError("Nothing to plot: the log history has no loss or eval/* entries with a step.")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted(k for k in series if k == "loss" or k.startswith("loss/")):
        steps, values = zip(*series[key])
        left.plot(steps, values, marker=".", label="total" if key == "loss" else key.removeprefix("loss/"))
    left.set(xlabel="optimizer step", ylabel="training loss (per token)", yscale="log", title="loss terms")
    left.legend(fontsize=8)
    if "eval/kl" in series:
        steps, values = zip(*series["eval/kl"])
        right.plot(steps, values, marker="o", color="tab:red", label="held-out KL(teacher || student)")
        right.set_ylabel("KL (nats per token)", color="tab:red")
    right.set(xlabel="optimizer step", title="held-out")
    if "eval/rouge_l" in series:
        other = right.twinx()
        steps, values = zip(*series["eval/rouge_l"])
        other.plot(steps, values, marker="s", color="tab:blue", label="Rouge-L vs teacher answers")
        other.set_ylabel("Rouge-L", color="tab:blue")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda partial: fig.savefig(partial, dpi=110))
    plt.close(fig)
    return path
