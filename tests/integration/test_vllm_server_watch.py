"""A real vLLM server started by a process that is then SIGKILLed (no stop(), no atexit) does not outlive it: the
parent watch at the head of its process group stops the server and its engine processes."""

import subprocess
import sys
import time

import pytest
from process_groups import live_group_members, wait_until_gone

from hf_kd.parent_watch import GRACE_S

pytestmark = pytest.mark.vllm

LAUNCHER = """
import sys, time
from hf_kd.vllm_server import VLLMServer
server = VLLMServer(sys.argv[1], sys.argv[2], startup_timeout=600).start()
print(server.pid, flush=True)
time.sleep(3600)
"""


def test_a_server_stops_when_the_process_that_started_it_is_killed(teacher_path, vllm_python):
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(teacher_path), str(vllm_python)], stdout=subprocess.PIPE, text=True
    )
    try:
        group = int(launcher.stdout.readline())  # printed once /health answers
        assert len(live_group_members(group)) >= 3  # the watch, the API server and at least one engine process
    finally:
        launcher.kill()
        launcher.wait()
    started = time.monotonic()
    wait_until_gone(group, timeout=GRACE_S + 60)
    print(f"server group gone {time.monotonic() - started:.1f} s after its launcher was killed")
