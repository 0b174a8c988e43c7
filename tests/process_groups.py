"""Which processes of a process group still run: the tests of servers that must not outlive their launcher."""

import time
from pathlib import Path


def live_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that are not zombies (a zombie waits for a parent to reap it)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def wait_until_gone(pgid: int, timeout: float) -> None:
    """Returns once group ``pgid`` has no live process; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while live_group_members(pgid):
        assert time.monotonic() < deadline, f"group {pgid} still runs {live_group_members(pgid)}"
        time.sleep(0.2)
