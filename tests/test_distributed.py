"""Data-parallel distillation with two real processes on the CPU (gloo), launched by `accelerate launch`."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "examples"
ACCELERATE_CONFIG = EXAMPLES_DIR / "accelerate" / "cpu_2rank.yaml"
MAX_STEPS = 3
BATCH_SIZE = 2
NUM_EXAMPLES = 64  # examples/smoke.py's dataset size


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_rank") / "out"
    command = [
        *(sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"),
        *("--config_file", str(ACCELERATE_CONFIG)),
        str(EXAMPLES_DIR / "distill.py"),
        *("--config", str(EXAMPLES_DIR / "recipes" / "smoke.yaml")),
        *("--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", str(BATCH_SIZE)),
        *("--record_shards", "--output_dir", str(out)),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "WANDB_DISABLED": "true",
    }
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return out


def read_records(out: Path) -> list[dict]:
    paths = sorted((out / "shards").glob("rank*.json"))
    return [json.loads(path.read_text()) for path in paths]


def test_both_ranks_ran_on_cpu_with_gloo(two_rank_run):
    records = read_records(two_rank_run)
    assert [r["rank"] for r in records] == [0, 1]
    for record in records:
        assert record["world_size"] == 2
        assert record["backend"] == "gloo"
        assert record["device"].startswith("cpu")
        assert record["global_step"] == MAX_STEPS


def test_data_is_sharded_across_ranks(two_rank_run):
    rank0, rank1 = (set(r["example_ids"]) for r in read_records(two_rank_run))
    for ids in (rank0, rank1):
        assert len(ids) >= MAX_STEPS * BATCH_SIZE  # every step trained on a batch of its own
        assert ids <= set(range(NUM_EXAMPLES))
    assert not rank0 & rank1, f"both ranks saw examples {sorted(rank0 & rank1)}"


def test_ranks_end_with_the_same_student_and_save_it(two_rank_run):
    """Different data, identical weights after training: DDP averaged the gradients. Rank 0 saved that student."""
    records = read_records(two_rank_run)
    assert records[0]["student_digest"] == records[1]["student_digest"]
    assert (two_rank_run / "model.safetensors").is_file()

    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES_DIR))
        distill = importlib.import_module("distill")
    saved = AutoModelForCausalLM.from_pretrained(two_rank_run)
    assert distill.parameter_digest(saved) == records[0]["student_digest"]
