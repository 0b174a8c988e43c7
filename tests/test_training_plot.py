"""The training-curve plot: which logged values it reads, and a PNG it writes."""

from __future__ import annotations

import pytest

from hf_kd.training_plot import curves, plot_training_curves

HISTORY = [
    {"eval/kl": 4.0, "eval/rouge_l": 10.0, "step": 0},
    {"loss": 2.0, "loss/ce": 3.0, "loss/akl": 1.0, "learning_rate": 1e-4, "step": 5},
    {"loss": 1.0, "loss/ce": 1.5, "loss/akl": 0.5, "step": 10},
    {"eval/kl": 2.0, "eval/rouge_l": 30.0, "step": 10},
    {"train_runtime": 12.0},
]


def test_curves_keep_loss_terms_and_held_out_metrics_by_step():
    series = curves(HISTORY)
    assert series["loss/ce"] == [(5, 3.0), (10, 1.5)]
    assert series["eval/rouge_l"] == [(0, 10.0), (10, 30.0)]
    assert "learning_rate" not in series and "train_runtime" not in series


def test_plot_writes_a_png(tmp_path):
    path = plot_training_curves(HISTORY, tmp_path / "curves.png", title="demo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="Nothing to plot"):
        plot_training_curves([{"train_runtime": 1.0}], tmp_path / "empty.png")
