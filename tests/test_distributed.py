"""Data-parallel distillation with two real processes on the CPU (gloo), launched by `accelerate launch` on the
distillation script with a shard-recording collator (tests/shard_recorder.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_kd.hub import MODULES_FILE

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "examples"
ACCELERATE_CONFIG = EXAMPLES_DIR / "accelerate" / "cpu_2rank.yaml"
MAX_STEPS = 3
BATCH_SIZE = 2
NUM_EXAMPLES = 64  # hf_kd.smoke's dataset size
RECORDER = Path(__file__).resolve().parent / "shard_recorder.py"


def launch(out: Path, *flags: str, processes: int = 2) -> Path:
    """The shard-recording distillation script on the smoke recipe: two gloo ranks through `accelerate launch`, or
    one plain process."""
    launcher = [sys.executable]
    if processes == 2:
        launcher += ["-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(ACCELERATE_CONFIG)]
    command = [
        *launcher,
        str(RECORDER),
        *("--config", str(EXAMPLES_DIR / "recipes" / "smoke.yaml")),
        *flags,
        *("--output_dir", str(out)),
    ]
    # This checkout's hf_kd (a script's own folder, not the working directory, leads sys.path); conftest has set
    # the offline defaults in os.environ.
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_rank") / "out"
    return launch(out, "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", str(BATCH_SIZE))


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


def assert_each_rank_trained_on_examples_of_its_own(records: list[dict]) -> None:
    rank0, rank1 = (set(r["example_ids"]) for r in records)
    for ids in (rank0, rank1):
        assert len(ids) >= MAX_STEPS * BATCH_SIZE  # every step trained on a batch of its own
        assert ids <= set(range(NUM_EXAMPLES))
    assert not rank0 & rank1, f"both ranks saw examples {sorted(rank0 & rank1)}"


def test_data_is_sharded_across_ranks(two_rank_run):
    assert_each_rank_trained_on_examples_of_its_own(read_records(two_rank_run))


def test_ranks_end_with_the_same_student_and_save_it(two_rank_run):
    """Different data, identical weights after training: DDP averaged the gradients. Rank 0 saved that student."""
    records = read_records(two_rank_run)
    assert records[0]["student_digest"] == records[1]["student_digest"]
    assert (two_rank_run / "model.safetensors").is_file()

    from shard_recorder import parameter_digest
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(two_rank_run)
    assert parameter_digest(saved) == records[0]["student_digest"]


def test_two_ranks_update_like_one_process_with_the_global_batch(tmp_path):
    """2 ranks x 2 examples and 1 process x 4 examples take the same SGD steps, for a recipe with the pairwise span
    term and a term on the prompt positions (off-policy, so both runs see the same sequences; dropout is off)."""
    flags = ["--kd_loss", "ce+dac_kl+span+prompt_fkl", "--span_segmenter", "punct", "--lmbda", "0", "--optim", "sgd"]
    flags += ["--learning_rate", "2.0", "--dac_kl_lr", "2.0", "--lr_scheduler_type", "constant", "--max_steps", "2"]
    ranks = launch(tmp_path / "ranks", *flags, "--per_device_train_batch_size", "2")
    single = launch(tmp_path / "single", *flags, "--per_device_train_batch_size", "4", processes=1)
    rank_ids = [set(r["example_ids"]) for r in read_records(ranks)]
    (single_ids,) = [set(r["example_ids"]) for r in read_records(single)]
    assert rank_ids[0] | rank_ids[1] == single_ids and not rank_ids[0] & rank_ids[1]  # one global batch, split

    from safetensors.torch import load_file

    for name in ("model.safetensors", MODULES_FILE):
        got, want = load_file(ranks / name), load_file(single / name)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def test_length_grouped_batches_are_sharded_across_ranks(tmp_path):
    """``train_sampling_strategy="group_by_length"`` (transformers' sampler over the token counts hf_kd adds to a
    chat dataset) under two ranks: each rank trains on examples of its own, the ranks stay in sync, and the first
    global batch holds the longest conversation (the sampler puts it first; a random order would in 4 of 64)."""
    flags = ["--train_sampling_strategy", "group_by_length", "--max_steps", str(MAX_STEPS)]
    out = launch(tmp_path / "out", *flags, "--per_device_train_batch_size", str(BATCH_SIZE))
    records = read_records(out)
    assert_each_rank_trained_on_examples_of_its_own(records)
    assert records[0]["student_digest"] == records[1]["student_digest"]
    longest = max(records[0]["dataset_lengths"])
    assert longest in records[0]["batch_lengths"][0] + records[1]["batch_lengths"][0]
