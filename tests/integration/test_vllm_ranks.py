"""vLLM rollouts under two processes (CPU, gloo; tests/integration/vllm_ranks_worker.py under torchrun): the main
process alone starts the server from the student and pushes the weights, every rank generates through that server,
and after the last push each rank's greedy rollouts from it equal transformers' generate of that rank's student."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from hf_kd.assets import make_layer_pruned_student
from hf_kd.vllm_server import free_port

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("vllm_ranks_worker.py")


def test_two_ranks_roll_out_from_one_server_that_follows_the_student(teacher_path, vllm_python, tmp_path):
    student = make_layer_pruned_student(teacher_path, 2, tmp_path / "student")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command = [*launcher, str(WORKER), str(tmp_path), str(student), str(teacher_path), str(vllm_python)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    assert [r["owns_server"] for r in records] == [True, False]  # one server, started by the main process
    assert records[0]["url"] == records[1]["url"]
    for rank, record in enumerate(records):
        assert record["global_step"] == 2
        assert record["served"] == record["generated"], f"rank {rank} samples from other weights than its student's"
        assert record["generated"] != record["before"]  # the steps changed the greedy rollouts
    with pytest.raises(OSError):  # its owner stopped it on exit
        urllib.request.urlopen(records[0]["url"].removesuffix("/v1") + "/health", timeout=5)
