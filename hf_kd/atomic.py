"""Atomic file writes: a file is replaced whole or not at all, so a kill or an error mid-write never leaves half of it.

This module imports only the standard library, so that the benchmark harness can load it by path (as it does
``environment.py``) without importing transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(partial)`` on a temporary file in ``path``'s folder, then rename it onto ``path``.

    Until the rename, ``path`` keeps its old contents (or stays absent); if ``write`` raises, the temporary file is
    removed and the error propagates. Returns ``path``.
    """
    path = Path(path)
    # Hidden, in the same folder (a rename never crosses file systems), and with the same suffix, for writers that
    # pick the format from it (matplotlib's savefig).
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)`` (UTF-8), atomically (see ``write_atomically``)."""
    return write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))
