"""glibc malloc settings that let the loss engine reuse its chunk temporaries instead of re-mapping them.

Each chunk of the engine (``hf_kd.losses.core``) allocates five to eight [rows, V] float32 buffers of 64 MiB and
frees them when the chunk ends. glibc serves blocks that large with mmap (its threshold is at most 32 MiB) and
unmaps them on free, so every page of every chunk's temporaries is faulted in and zeroed again: hundreds of
thousands of minor page faults per step. Smaller chunks avoid mmap but make the head matmuls re-read the [V, d]
weights once per chunk, which at V = 262144 costs more than the divergence itself.

``tune_for_chunks`` serves every block from the heap (``M_MMAP_MAX`` = 0) and never trims it (``M_TRIM_THRESHOLD``
at its largest), so freed chunks stay mapped for the next one: the heap then behaves like a caching allocator,
holding on to the process's peak (benchmarks/README.md has the measured effect on a step).

It changes malloc for the whole process, so nothing applies it as a side effect of an import or of a loss call: a
program opts in by calling it once. ``DistillationTrainer`` does when it trains on CPU, and so do the benchmarks
for hf_kd's rows; a loop that calls the loss engine itself may do the same. Set ``HF_KD_TUNE_MALLOC=0`` to leave
malloc as it is even then. Nothing happens where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_applied: bool | None = None  # None: not tried yet in this process


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def tune_for_chunks() -> bool:
    """Applies the settings once per process; True when they are in effect."""
    global _applied
    if _applied is None:
        libc = None if os.environ.get("HF_KD_TUNE_MALLOC", "1") == "0" else _glibc()
        _applied = bool(
            libc is not None and libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
        )
        if _applied:
            logger.debug("glibc malloc: heap only, no trimming (HF_KD_TUNE_MALLOC=0 skips)")
    return _applied
