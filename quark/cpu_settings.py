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
  until the next probe. A count needs free cores: `CpuLoad` reads how many cores other processes kept busy since
  the last look (Linux /proc/stat idle time of the cores this process may run on, less this process's own CPU time;
  measured on a 2-core machine: 0.00-0.07 idle, 1.00-1.05 beside one CPU-bound process, over 0.1-0.5 s), and a
  count n is run only while others leave n - 1 cores beside ours (up to SLACK of a core short: beside a
  CPU-bound process, windows of ~0.1 s read 0.63-1.0 while our own threads also ran there). A probe of two
  threads on a core another process holds costs a fresh stream its wake-up stall (one step of 0.2 s among 5 ms
  steps; a 64-token stream fell from ~170 to 81-136 tok/s); now it is not run. While the load keeps counts out, it
  is looked at again every RECHECK steps (a window of at least MIN_WINDOW), and a count it lets back in is probed
  at once (a reading since import can include a passing burst, such as the kernel's work while the weights load:
  1.48 cores once on an idle machine). Without a reading (another OS, no window yet) every count is probed. A
  round starts at the most threads the free cores allow (idle: all cores at once) and probes the others; the first
  step ever at a count is not measured when it compiles quark/fast.py's CPU step for that count (guarded on the
  thread count; quark's C++ decode layer compiles nothing).
  Two probe steps in a row CUT (1.5x) slower than the best median so far end that probe at once (one slow step
  alone can be a hiccup: 80 ms among 5 ms steps on an idle machine), so a losing probe costs two steps. While the
  winner keeps winning, the probes are spaced ever further apart (FIRST_INTERVAL steps, doubling up to
  MAX_INTERVAL); a change of winner resets the spacing, and so does the winner's own steps turning CUT slower than
  when it won (another process arriving while all cores run): that starts a round at once. The tuner is kept per
  model (quark/fast.py), so later generations start from what earlier ones learned. A sample is the time from one
  step's start to the next's, so the sampling and the caller's work between steps (which run at the same count:
  torch's count is left set between steps) are measured too; `release()` restores the count the runner found (the
  decoder calls it before a prefill and when a generation lets it go).
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
MIN_WINDOW = 0.1  # seconds: the shortest window CpuLoad answers for (idle time is kept in clock ticks)
SLACK = 0.3  # cores: other processes may use this much of the cores a count needs (idle readings: 0.00-0.07)
RECHECK = 8  # steps between looks at the load while it keeps the tuner from counts it could run
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


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


class CpuLoad:
    """How many cores other processes kept busy lately, on the cores this process may run on (see the module
    docstring). `others()` answers for the time since the previous answer (the first: since quark was imported)."""

    def __init__(self, since: tuple[float, float, float] | None = None):
        self.cpus = _affinity()
        self.last = since or self._read()
        self.value: float | None = None  # the last answer

    def _read(self) -> tuple[float, float, float] | None:
        """(wall clock, idle seconds of our cores, this process's CPU seconds), or None where /proc/stat is not."""
        try:
            with open("/proc/stat") as f:
                lines = [ln.split() for ln in f if ln.startswith("cpu") and ln[3:4].isdigit()]
            idle = sum(int(x[4]) + int(x[5]) for x in lines if int(x[0][3:]) in self.cpus)
            return time.perf_counter(), idle / _TICKS, time.process_time()
        except (OSError, ValueError, IndexError):
            return None

    def others(self) -> float | None:
        """Cores busy with other processes since the last answer; under MIN_WINDOW after it, that answer again (None
        before the first, or where /proc/stat is not)."""
        now = self._read()
        if now is None or self.last is None:
            return None
        if now[0] - self.last[0] < MIN_WINDOW:
            return self.value
        (t0, idle0, own0), (t1, idle1, own1) = self.last, now
        self.last = now
        wall = t1 - t0
        self.value = max(0.0, (len(self.cpus) * wall - (idle1 - idle0) - (own1 - own0)) / wall)
        return self.value


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


class ThreadTuner:
    """Runs decode steps at the thread count measured fastest lately (see the module docstring)."""

    def __init__(self, max_threads: int | None = None, clock: Callable[[], float] = time.perf_counter,
                 load: Callable[[], float | None] | None = None):
        self.restore_to = torch.get_num_threads()
        self.cands = candidates(max_threads or self.restore_to)
        self.clock = clock
        self.load = load if load is not None else CpuLoad(since=_IMPORTED.last).others
        self.median: dict[int, float] = {}
        self.samples: list[float] = []
        self.ran: set[int] = set()  # counts that have run a step (compiled there)
        self.interval, self.until_probe = FIRST_INTERVAL, 0
        self.last: float | None = None  # when the previous step started
        self.best = self.current = 1
        self._round(first=True)

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
        """The step was run (compiled) at these counts outside `run`, or compiles nothing: first steps are measured."""
        self.ran.update(counts)

    def release(self) -> None:
        """Back to the count found at creation; the next step starts a new interval."""
        self.last = None
        torch.set_num_threads(self.restore_to)

    def allowed(self) -> list[int]:
        """The candidate counts the cores that other processes leave free can run (all of them if unknown)."""
        busy = self.load()
        cores = max(self.cands)
        return [c for c in self.cands if busy is None or c == 1 or busy <= cores - c + SLACK]

    def _round(self, first: bool = False) -> None:
        """Start a round of probes over the allowed counts: the first round from the most threads, later ones from
        the others than the winner (the winner's latest steps are its measurement)."""
        allowed = self.allowed()
        self.n_allowed = len(allowed)  # fewer than all: the load is looked at again every RECHECK steps
        self.queue = sorted(allowed, reverse=True) if first else [c for c in allowed if c != self.best]
        # this round's medians: the winner's latest and each probe's (a count left out keeps no old figure)
        self.scores = {} if first or self.best not in self.median else {self.best: self.median[self.best]}
        self.probing = bool(self.queue)
        if self.probing:
            self._next(self.queue.pop(0))
        else:  # nothing else to try (the other cores are busy): run the winner for another interval
            self.until_probe, self.samples = self.interval, []

    def _record(self, dt: float) -> None:
        self.samples.append(dt)
        if not self.probing:  # running the winner; its last steps are its next measurement
            self.samples = self.samples[-PROBE_SAMPLES:]
            self.until_probe -= 1
            full = len(self.samples) == PROBE_SAMPLES  # (every round probes: the winner always has a median)
            slower = full and _median(self.samples) > CUT * self.median[self.best]
            # cores freed (or a busy reading that was a passing burst, e.g. the kernel's work loading the weights)
            freed = (self.n_allowed < len(self.cands) and self.until_probe % RECHECK == 0
                     and len(self.allowed()) > self.n_allowed)
            if (self.until_probe > 0 and not slower and not freed) or len(self.cands) == 1:
                return
            if slower:
                self.interval = FIRST_INTERVAL
            if full:
                self.median[self.best] = _median(self.samples)
            self._round()
            return
        measured = self.samples[1:] if self.skip else self.samples
        if not measured:
            return
        ref = min(self.scores.values(), default=None)
        if ref is not None and len(measured) >= 2 and min(measured[-2:]) > CUT * ref:  # clearly losing: end now
            measured = measured[-2:]
        elif len(measured) < PROBE_SAMPLES:
            return
        self.median[self.current] = self.scores[self.current] = _median(measured)
        if self.queue:
            self._next(self.queue.pop(0))
            return
        winner = min(self.scores, key=self.scores.get)
        self.interval = FIRST_INTERVAL if winner != self.best else min(2 * self.interval, MAX_INTERVAL)
        self.best, self.until_probe, self.probing = winner, self.interval, False
        self._next(winner)

    def _next(self, n: int) -> None:
        """Run count n from the next step; its first step is not measured if it is the first at that count."""
        self.skip = n not in self.ran
        self.current, self.samples = n, []


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


_IMPORTED = CpuLoad()  # a tuner's first round sees the machine since quark was imported


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
