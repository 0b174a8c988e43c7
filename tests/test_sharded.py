"""FSDP2 on two CPU ranks (gloo): the trainer's loss step on sharded models equals the unsharded one.

One `torchrun` launch of tests/sharded_worker.py serves every test here. Each rank runs the trainer's training step
on its own batch with student and teacher wrapped by `torch.distributed.fsdp.fully_shard`; the reference is the same
trainer on the unsharded models in one process: the loss of that batch, and the mean gradient of both batches (what
FSDP2's averaging gradient reduction must give).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_worker.py"
SCENARIOS = ["akl_tied", "akl_root_unsharded", "mgsr", "dskd_same_vocab", "dskd_cross_vocab"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return out


def records(out: Path, scenario: str) -> list[dict]:
    return [json.loads((out / f"{scenario}.rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_loss_and_gradients_match_unsharded(sharded_run, scenario):
    for record in records(sharded_run, scenario):
        assert (record["world_size"], record["backend"]) == (2, "gloo")
        assert record["student_sharded"] and record["teacher_sharded"]
        assert record["loss"] == pytest.approx(record["reference_loss"], rel=1e-5)
        assert not record["missing_gradients"]
        worst = max(record["max_grad_diff"].values())
        assert worst <= 1e-5 * record["max_grad"], (scenario, record["max_grad_diff"])


@pytest.mark.parametrize("scenario", ["mgsr", "dskd_same_vocab", "dskd_cross_vocab"])
def test_helper_gradients_are_averaged_over_ranks(sharded_run, scenario):
    """DAC-KL's sub-network and the DSKD projectors are trained: their gradients equal the two-batch mean."""
    for record in records(sharded_run, scenario):
        assert record["helpers"]
        for name in record["helpers"]:
            assert record["max_grad_diff"][name] <= 1e-5 * record["max_grad"] + 1e-9, name


def test_sharded_checkpoint_resumes_exactly(sharded_run):
    """Saved after one step (student shards, projectors, optimizer state), restored into fresh sharded models: the
    same weights, and the next step gives the same loss and the same weights as the run that was not stopped."""
    for record in records(sharded_run, "dskd_cross_vocab"):
        checkpoint = record["checkpoint"]
        assert checkpoint["restored_max_diff"] == 0.0
        assert checkpoint["resumed_loss"] == checkpoint["uninterrupted_loss"]
        assert checkpoint["after_step_max_diff"] == 0.0


def test_trainer_fsdp2_checkpoint_with_helpers_in_the_optimizer_resumes_exactly(sharded_run):
    """The Trainer's own FSDP2 checkpoint (accelerate's save_fsdp_model/save_fsdp_optimizer): transformers' method
    alone fails on the helper parameters in the optimizer (KeyError); hf_kd's sets their state aside in a file of its
    own, and a fresh sharded trainer resumes to the same next step."""
    for record in records(sharded_run, "dskd_cross_vocab"):
        checkpoint = record["trainer_checkpoint"]
        assert checkpoint["plain_save_error"] == "KeyError"
        assert checkpoint["helper_state_file"]
        assert checkpoint["restored_max_diff"] == 0.0
        assert checkpoint["resumed_loss"] == checkpoint["uninterrupted_loss"]
        assert checkpoint["after_step_max_diff"] == 0.0


def test_final_student_is_a_plain_hugging_face_folder(sharded_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sharded_run / "dskd_cross_vocab" / "final"
    student = AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    sys.path.insert(0, str(WORKER.parent))
    from sharded_worker import digest

    assert digest(student.state_dict()) == records(sharded_run, "dskd_cross_vocab")[0]["checkpoint"]["final_digest"]
    assert torch.isfinite(student(torch.tensor([[1, 2, 3]])).logits).all()


def sharding_check(fsdp_enabled: bool, fsdp2: bool, fsdp_requested: bool = True, fused_loss: bool = True):
    """Run `DistillationTrainer._check_sharding` on a stand-in trainer with the given accelerate state."""
    from types import SimpleNamespace

    from hf_kd import DistillationTrainer

    trainer = SimpleNamespace(
        args=SimpleNamespace(fsdp=fsdp_requested, fused_loss=fused_loss, bridge=None),
        is_fsdp_enabled=fsdp_enabled,
        is_deepspeed_enabled=False,
        accelerator=SimpleNamespace(is_fsdp2=fsdp2, distributed_type="MULTI_CPU"),
    )
    DistillationTrainer._check_sharding(trainer)


def test_fsdp1_with_fused_loss_names_the_configuration_that_works():
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        sharding_check(fsdp_enabled=True, fsdp2=False)
    sharding_check(fsdp_enabled=True, fsdp2=False, fused_loss=False)
    sharding_check(fsdp_enabled=True, fsdp2=True)


def test_fsdp_request_that_did_not_shard_warns(sharded_run):
    """Two CPU ranks with `fsdp=True`: accelerate runs DDP (MULTI_CPU) instead of sharding; the user is told so."""
    rank0, rank1 = records(sharded_run, "fsdp_request")
    for record in (rank0, rank1):
        assert record["distributed_type"] == "MULTI_CPU" and not record["fsdp_enabled"]
    assert any("FSDP was requested but this run is not sharded" in m for m in rank0["warnings"])  # main process
