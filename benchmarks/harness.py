"""Set-up shared by the benchmark scripts (speed_memory.py, quality.py).

Importing it applies hf_kd's offline environment defaults (hf_kd/environment.py, loaded by path so that no Hugging
Face library reads the environment before they are set). `environment` records library versions and hardware;
`run_in_fresh_process` runs one configuration in a new Python process, so that each row starts from a clean state
(peak memory, caches, threads) and a crash becomes a record instead of ending the benchmark. `format_table` (with
`cell` and `percent` for its cells) writes every results table; `replace_readme_section` rewrites a section of
README or of a docs page.
Importing it also puts this checkout first on ``sys.path``, so a benchmark times this hf_kd, not another installed
copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
_ENVIRONMENT = runpy.run_path(str(ROOT / "hf_kd" / "environment.py"))
_ENVIRONMENT["apply_defaults"](_ENVIRONMENT["OFFLINE_DEFAULTS"])
write_text_atomically = runpy.run_path(str(ROOT / "hf_kd" / "atomic.py"))["write_text_atomically"]
"""How the benchmarks write their results: a kill mid-write never leaves half a JSON for ``--resume`` to read."""


def environment() -> dict[str, Any]:
    """Library versions and hardware, recorded with the results."""
    import torch
    import transformers
    import trl

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_in_fresh_process(script: str | Path, spec: Any, threads: int | None, timeout: float) -> dict[str, Any]:
    """`script --child <spec as JSON> --child-out <file>` in a new process with `threads` OMP/MKL threads (None:
    the default); returns the record the child wrote, or `{"error": ...}` with the exit status and the last lines
    of its output."""
    env = dict(os.environ)
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, str(script), "--child", json.dumps(dataclasses.asdict(spec)), "--child-out", out.name]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        text = Path(out.name).read_text()
    if proc.returncode != 0 or not text:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(text)


def format_table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table of ``head`` and ``rows`` (cells already formatted), ending in a newline."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def cell(value: Any, spec: str) -> str:
    """A table cell: ``value`` in format ``spec``, or "-" when it is missing (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def percent(value: float | None, spec: str = ".0f") -> str:
    """A fraction as a percentage cell ("-" when missing)."""
    return "-" if value is None else f"{100 * value:{spec}}%"


def replace_readme_section(readme: Path, heading: str, lines: list[str]) -> None:
    """Rewrites ``readme`` (README or a docs page) from ``heading`` to the next heading of its level or above (or
    the end) with ``lines``, heading included: how each benchmark regenerates its section."""
    text = readme.read_text()
    found = re.search(f"^{re.escape(heading)}$", text, re.MULTILINE)
    if found is None:
        raise SystemExit(f"{readme} has no '{heading}' heading to rewrite.")
    start = found.start()
    level = len(heading) - len(heading.lstrip("#"))
    ends = [text.find("\n" + "#" * n + " ", found.end()) for n in range(1, level + 1)]
    end = min((e + 1 for e in ends if e >= 0), default=len(text))
    write_text_atomically(readme, text[:start] + "\n".join(lines) + "\n" + text[end:])
