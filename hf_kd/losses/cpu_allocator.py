"""glibc malloc settings that let the loss engine reuse its chunk temporaries instead of re-mapping them.

Each chunk of the engine (``hf_kd.losses.core``) allocates a dozen [rows, V] float32 temporaries of just under
32 MiB and frees them when the chunk ends. With glibc's defaults the trim threshold follows the largest freed
block (twice it, at most 64 MiB), so the freed top of the heap is handed back to the kernel after every chunk and
every page of the next chunk's temporaries is faulted in and zeroed again. Measured on the loss-side benchmark
(384 rows, V = 151936, one thread): about 220,000-300,000 minor page faults per step and 7.0-8.1 s of CPU time
with the defaults, against 85,000-170,000 faults (the weight gradient's first touch, which the head matmuls pay
too) and 6.5-6.9 s with the thresholds below.

``tune_for_chunks`` fixes the mmap threshold at glibc's maximum (32 MiB, so the temporaries come from the heap)
and the trim threshold at 1 GiB (so freed chunks stay mapped for the next one). It runs once per process, on the
engine's first call on CPU; memory the process frees below 1 GiB is then kept for reuse rather than returned to
the OS. Set ``HF_KD_TUNE_MALLOC=0`` to leave malloc as it is. Nothing happens where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1 << 30
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
    """Applies the thresholds once per process; True when they are in effect."""
    global _applied
    if _applied is None:
        libc = None if os.environ.get("HF_KD_TUNE_MALLOC", "1") == "0" else _glibc()
        _applied = bool(
            libc is not None
            and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
        if _applied:
            logger.debug("glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB (HF_KD_TUNE_MALLOC=0 skips)")
    return _applied
