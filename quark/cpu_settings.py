"""How many CPU threads a decode step uses: chosen at run time from measured step times.

Choices:
- torch's CPU wheel runs its parallel ops on GNU libgomp, which reads OMP_WAIT_POLICY / GOMP_SPINCOUNT once, when
  torch is imported. `import quark` imports torch, so no Quark code can set them for a command (the `quark` command
  used to set OMP_WAIT_POLICY=PASSIVE in main(); `OMP_DISPLAY_ENV=verbose` shows GOMP_SPINCOUNT stayed at libgomp's
  default 300000, i.e. never applied). What can change at run time is the thread count (`torch.set_num_threads`,
  about 1 us), so that is the knob.
- Why it matters: a batch-1 decode step of quark-72m is ~60 small parallel ops. libgomp's default lets idle
  workers spin (300,000 spins) before sleeping, so on an idle machine each op starts at once: the multi-thread step
  is fastest. When another process holds a core, a spinning worker and the main thread share it and every op
  waits at the region's barrier (measured on a 2-core machine: 63.6 -> 17.3 tok/s); one thread has no barrier
  to wait at.
  llama.cpp (llama-cpp-python's build also uses libgomp) opens one parallel region per token with barriers
  between ops, so it meets the same trade-off; by default llama-cpp-python uses half the cores (1 of 2 here).
- `ThreadTuner` (spin-then-settle at the level of thread counts): decode steps alternate short probes of each
  candidate count (one, half, all cores), take the median of each probe's PROBE_SAMPLES steps and run the fastest
  until the next probe. The first step ever at a count is not measured: it compiles quark/fast.py's CPU step for
  that count (guarded on the thread count). One thread goes first and sets the reference. Two probe steps in a
  row CUT (1.5x) slower than the best median so far end that probe at once (one slow step alone can be a
  hiccup: 80 ms among 5 ms steps on an idle machine), so a losing probe costs two steps; that includes the
  step that wakes sleeping workers, which on a core another process holds can stall for ~0.2 s (measured on a
  2-core machine: 185 ms, against 11 ms steps). While the winner keeps winning, the probes are
  spaced ever further apart (FIRST_INTERVAL steps, doubling up to MAX_INTERVAL); a change of winner resets the
  spacing, and so does the winner's own steps turning CUT slower than when it won (another process arriving
  while all cores run): that starts a probe at once. The tuner is kept per model (quark/fast.py), so later
  generations start from what earlier ones learned. A sample is the time from one step's start to the next's,
  so the sampling and the caller's work between steps (which run at the same count: torch's count is left set
  between steps) are measured too; `release()` restores the count the runner found (the decoder calls it
  before a prefill and when a generation lets it go).
- `QUARK_THREADS`: unset or "auto" tunes; an integer N pins decode steps to N threads (what tests and
  benchmarks use to compare fixed settings).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
PROBE_SAMPLES = 3  # measured steps per probe
CUT = 1.5  # a probe step this much slower than the best median so far ends the probe
FIRST_INTERVAL, MAX_INTERVAL = 48, 768


def threads_setting() -> int | None:
    """None for automatic tuning, else the pinned thread count from QUARK_THREADS."""
    v = os.environ.get("QUARK_THREADS", "auto").strip().lower()
    if v in ("", "auto"):
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"QUARK_THREADS={v!r}: allowed values are auto or a positive integer")
    return int(v)


def candidates(max_threads: int) -> list[int]:
    """One thread first (the safe reference), then half the cores, then all."""
    return sorted({max_threads, max(1, max_threads // 2), 1})


class ThreadTuner:
    """Runs decode steps at the thread count measured fastest lately (see the module docstring)."""

    def __init__(self, max_threads: int | None = None, clock: Callable[[], float] = time.perf_counter):
        self.restore_to = torch.get_num_threads()
        self.cands = candidates(max_threads or self.restore_to)
        self.clock = clock
        self.median: dict[int, float] = {}
        self.samples: list[float] = []
        self.best = self.current = self.cands[0]
        self.queue = self.cands[1:]  # still to probe in this round
        self.ran: set[int] = set()  # counts that have run a step (compiled there)
        self.skip = True  # the current probe's first step is not measured
        self.probing = True
        self.interval, self.until_probe = FIRST_INTERVAL, 0
        self.last: float | None = None  # when the previous step started

    def run(self, step: Callable[[], T]) -> T:
        """Run one decode step at the chosen count (left set for what follows until the next step)."""
        now = self.clock()
        if self.last is not None:
            self._record(now - self.last)
        self.last = now
        if torch.get_num_threads() != self.current:
            torch.set_num_threads(self.current)
        self.ran.add(self.current)
        return step()

    def compiled_at(self, counts: list[int]) -> None:
        """The step was run (compiled) at these counts outside `run`: their first probe steps are measured too."""
        self.ran.update(counts)

    def release(self) -> None:
        """Back to the count found at creation; the next step starts a new interval."""
        self.last = None
        torch.set_num_threads(self.restore_to)

    def _record(self, dt: float) -> None:
        self.samples.append(dt)
        if not self.probing:  # running the winner; its last steps are its next measurement
            self.samples = self.samples[-PROBE_SAMPLES:]
            self.until_probe -= 1
            slower = len(self.samples) == PROBE_SAMPLES and _median(self.samples) > CUT * self.median[self.best]
            if (self.until_probe > 0 and not slower) or len(self.cands) == 1:
                return
            if slower:
                self.interval = FIRST_INTERVAL
            self.median[self.best] = _median(self.samples)
            self.queue = [c for c in self.cands if c != self.best]
            self._next(self.queue.pop(0))
            self.probing = True
            return
        measured = self.samples[1:] if self.skip else self.samples
        if not measured:
            return
        ref = min(self.median.values(), default=None)
        if ref is not None and len(measured) >= 2 and min(measured[-2:]) > CUT * ref:  # clearly losing: end now
            measured = measured[-2:]
        elif len(measured) < PROBE_SAMPLES:
            return
        self.median[self.current] = _median(measured)
        if self.queue:
            self._next(self.queue.pop(0))
            return
        winner = min(self.median, key=self.median.get)
        self.interval = FIRST_INTERVAL if winner != self.best else min(2 * self.interval, MAX_INTERVAL)
        self.best, self.until_probe, self.probing = winner, self.interval, False
        self._next(winner)

    def _next(self, n: int) -> None:
        """Run count n from the next step; its first step is not measured if it is the first at that count."""
        self.skip = n not in self.ran
        self.current, self.samples = n, []


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


class Pinned:
    """Decode steps at a fixed thread count (QUARK_THREADS=N); `release()` restores the count found at creation."""

    def __init__(self, n: int):
        self.n, self.restore_to = n, torch.get_num_threads()

    def run(self, step: Callable[[], T]) -> T:
        if torch.get_num_threads() != self.n:
            torch.set_num_threads(self.n)
        return step()

    def release(self) -> None:
        torch.set_num_threads(self.restore_to)


def step_runner() -> ThreadTuner | Pinned | None:
    """What a CPU decoder wraps its steps in: a pinned count (QUARK_THREADS=N), a tuner, or nothing when torch
    runs one thread anyway."""
    n = threads_setting()
    if n is not None:
        return Pinned(n)
    return ThreadTuner() if torch.get_num_threads() > 1 else None
