"""Where training time goes: a process-wide phase timer the renderer and the trainer report to when it is on.

Off (the default) a phase costs one attribute check. On, each phase's wall time is summed, with a CUDA
synchronisation around it when a GPU is in use, so asynchronous kernels are charged to the phase that queued them.
Phases may nest (a field forward inside a render); each reports its own inclusive time.

    from dfield.core.profiling import PROFILER
    PROFILER.enable()
    ...train...
    PROFILER.take()            # {"march": 12.3, "density": 40.1, ...} seconds since the last take
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Sums wall seconds per named phase while enabled."""

    def __init__(self):
        self.enabled = False
        self.cuda = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def enable(self, on: bool = True) -> None:
        """Start (or stop) timing; synchronises CUDA around phases when CUDA is initialised."""
        self.enabled = on
        self.cuda = on and torch.cuda.is_available() and torch.cuda.is_initialized()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (no-op while disabled)."""
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last `take`, and reset."""
        out = dict(self.seconds)
        self.seconds.clear()
        self.calls.clear()
        return out


PROFILER = PhaseTimer()
