"""Run a command and stop its whole process group when the process that launched it dies.

``VLLMServer`` starts vLLM in a process group of its own (so that ``stop()`` reaches the engine's worker
processes too); a group of its own also means that a training process killed with SIGKILL, or by an out-of-memory
killer, left its server running, holding cores and gigabytes until someone found it. This file runs first in that
group, under the engine's interpreter (standard library only: vLLM's virtualenv does not have hf_kd), as

    python parent_watch.py PARENT_PID COMMAND...

It starts COMMAND and exits with its exit code. If PARENT_PID is no longer its parent (the launcher died and this
process was re-parented), it sends SIGTERM to the group and, once COMMAND exits or ``GRACE_S`` seconds later,
SIGKILL. A SIGTERM sent to the group (``VLLMServer.stop``) reaches the command directly; this process then waits
for the command's exit, so that the stopper's grace period is the command's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

POLL_S = 0.5
GRACE_S = 10.0


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to this process group; once the command exits, or after ``GRACE_S`` s, SIGKILL to what is left of it
    (this process included: it ends here)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python parent_watch.py PARENT_PID COMMAND...", file=sys.stderr)
        return 2
    parent_pid, command = int(argv[0]), argv[1:]
    signal.signal(signal.SIGTERM, lambda *_: None)  # the command got it too: wait for its exit below
    child = subprocess.Popen(command)
    while True:
        try:
            return child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent_pid:
            stop_group(child)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
