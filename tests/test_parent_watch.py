"""hf_kd/parent_watch.py: the command's exit code passes through, a SIGTERM to the group waits for the command, and
the group is stopped when the launching process dies without stopping it (the leak of a SIGKILLed trainer's server).
The command here is a plain Python process; tests/integration/test_vllm_server_watch.py runs a real vLLM server."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from process_groups import live_group_members, wait_until_gone

import hf_kd.parent_watch as parent_watch

WATCH = Path(parent_watch.__file__)


def test_exit_code_passes_through():
    command = [sys.executable, str(WATCH), str(os.getpid()), sys.executable, "-c", "raise SystemExit(3)"]
    assert subprocess.run(command, timeout=60).returncode == 3


def test_usage_error_without_a_parent_pid():
    completed = subprocess.run([sys.executable, str(WATCH), "sleep", "1"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "usage" in completed.stderr


def test_sigterm_to_the_group_waits_for_the_command():
    """The command traps SIGTERM, takes a second to finish and exits 7: the watcher reports 7, not its own death."""
    slow_stop = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.0), sys.exit(7)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    command = [sys.executable, str(WATCH), str(os.getpid()), sys.executable, "-c", slow_stop]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout.readline().strip() == "ready"
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 7


def test_the_group_stops_when_the_launcher_is_killed():
    """A launcher starts the watcher (and a long sleep under it) in a new group, then is SIGKILLed: the group ends."""
    launcher = (
        "import subprocess, sys, time\n"
        f"watch = subprocess.Popen([sys.executable, {str(WATCH)!r}, str(__import__('os').getpid()),\n"
        "                           sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "print(watch.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    group = int(process.stdout.readline())
    time.sleep(1.0)
    assert len(live_group_members(group)) == 2  # the watcher and its command
    process.kill()
    process.wait()
    wait_until_gone(group, timeout=parent_watch.GRACE_S + 20)
