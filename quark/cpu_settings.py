"""How many CPU threads a decode step uses: the cores other processes leave free, re-read every RECHECK steps.

Choices:
- Why it matters: a decode step is a few parallel regions a layer. With every core busy, one of our threads waits
  for a core another process holds at each region's barrier, and the step slows several-fold; one thread has no
  barrier to wait at. On an idle machine all cores are fastest. So the count follows the free cores.
- The rule: `CpuLoad` reads how many cores other processes kept busy since the last look (Linux /proc/stat idle
  time of the cores this process may run on, less this process's own CPU time), and a step runs on the cores left,
  a core counting as free while others use at most SLACK of it (readings: 0.00-0.07 on an idle machine, 0.63-1.0
  beside one CPU-bound process), at least one, at most torch's own count. It is read when a decoder starts (the window since the previous look, or since quark was
  imported) and again every RECHECK steps, so a process that arrives or leaves is followed within a fraction of a
  second. Where /proc/stat is missing (macOS, Windows) steps run at torch's count.
- Only the thread count can change at run time (`torch.set_num_threads`, ~1 us): torch's libgomp reads
  OMP_WAIT_POLICY / GOMP_SPINCOUNT once, when torch is imported, before any Quark code runs.
- `QUARK_THREADS`: unset or "auto" follows the rule; an integer N pins decode steps to N threads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
RECHECK = 32  # steps between looks at the load
MIN_WINDOW = 0.05  # seconds: a shorter window repeats the last answer
SLACK = 0.3  # cores: others may use this much of a core we count as free
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def threads_setting() -> int | None:
    """None for the free-cores rule, else the pinned thread count from QUARK_THREADS."""
    v = os.environ.get("QUARK_THREADS", "auto").strip().lower()
    if v in ("", "auto"):
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"QUARK_THREADS={v!r}: allowed values are auto or a positive integer")
    return int(v)


class CpuLoad:
    """How many cores other processes kept busy lately, on the cores this process may run on. `others()` answers
    for the time since the previous answer (the first: since `since`, or since this object was made)."""

    def __init__(self, since: tuple[float, float, float] | None = None):
        try:
            self.cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            self.cpus = set(range(os.cpu_count() or 1))
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
        """Cores busy with other processes since the last answer (within MIN_WINDOW of it: that answer again)."""
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


_IMPORTED = CpuLoad()  # a decoder's first look sees the machine since quark was imported


class Threads:
    """Runs decode steps on the cores other processes leave free (or on QUARK_THREADS of them); `release()` gives
    torch back the count found at creation."""

    def __init__(self, max_threads: int | None = None, load: Callable[[], float | None] | None = None):
        self.restore_to = torch.get_num_threads()
        self.pinned = threads_setting()
        self.max = max_threads or self.restore_to
        self.load = load or CpuLoad(since=_IMPORTED.last).others
        self.steps, self.n = 0, self.max

    def count(self) -> int:
        """The count the rule gives now."""
        busy = self.load()
        if busy is None:
            return self.max
        return max(1, min(self.max, int(len(_IMPORTED.cpus) - busy + SLACK)))

    def run(self, step: Callable[[], T]) -> T:
        """Run one decode step at the pinned count or the rule's (looked at every RECHECK steps)."""
        if self.pinned is not None:
            self.n = self.pinned
        elif self.steps % RECHECK == 0:
            self.n = self.count()
        self.steps += 1
        if torch.get_num_threads() != self.n:
            torch.set_num_threads(self.n)
        return step()

    def release(self) -> None:
        torch.set_num_threads(self.restore_to)
