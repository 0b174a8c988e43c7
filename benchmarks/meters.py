"""How one benchmark configuration is measured: in a fresh process (``speed_memory.py --child``), its measured steps
timed (wall clock and process CPU time) and its peak memory read (GPU allocator, or the resident-set high-water
mark)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from harness import run_in_fresh_process

CLI = Path(__file__).resolve().with_name("speed_memory.py")
"""The script whose ``--child`` runs one configuration (``trainer_steps.RunSpec`` or ``loss_side.LossSideSpec``)."""


class MemoryMeter:
    """Peak memory of the measured steps: GPU allocator peak, or the process's resident-set high-water mark.

    On CPU the kernel's VmHWM is reset (``/proc/self/clear_refs`` <- 5) when measuring starts, so the peak is
    that of the measured steps only; ``baseline`` is the resident memory at that moment (weights, optimizer
    state, allocator caches).
    """

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0.0

    @staticmethod
    def _status_kib(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1))

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = self._status_kib("VmRSS") / 1024

    def peak(self) -> float:
        """Peak memory since ``start`` in MiB (absolute: it includes ``baseline``)."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return self._status_kib("VmHWM") / 1024


class StepTimer:
    """Times steps and starts the memory meter before the first measured step (a ``TrainerCallback``)."""

    def __init__(self, spec: Any):
        self.spec = spec
        self.meter = MemoryMeter(spec.device)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.peak = 0.0
        self._t0 = self._c0 = 0.0

    def _sync(self) -> None:
        import torch

        if self.spec.device == "cuda":
            torch.cuda.synchronize()

    def begin(self, step: int) -> None:
        if step == self.spec.warmup:
            self.meter.start()
        self._sync()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def end(self, step: int) -> None:
        self._sync()
        elapsed, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        if step >= self.spec.warmup:
            self.times.append(elapsed)
            self.cpu_times.append(cpu)
            self.peak = max(self.peak, self.meter.peak())


def describe(spec: Any) -> dict[str, Any]:
    """The fields that name a configuration in its record."""
    keys = ("method", "vocab", "rows") if hasattr(spec, "rows") else ("method", "vocab", "seq", "batch")
    return {key: getattr(spec, key) for key in keys}


def run_in_subprocess(spec: Any, timeout: float) -> dict[str, Any]:
    """Runs ``spec`` in a fresh Python process (so peak memory is per configuration); errors become a record."""
    record = run_in_fresh_process(CLI, spec, spec.threads, timeout)
    return {**describe(spec), **record} if "error" in record else record
