"""The decode thread tuner: it settles on the count whose steps are fastest, follows a change of conditions (a
competing process), backs off probing a clearly slower count, does not probe counts other processes leave no cores
for, restores torch's count, and never changes tokens."""

import os
import subprocess
import sys
import time

import pytest
import torch

from quark import Quark
from quark.config import PRESETS
from quark.cpu_settings import (
    FIRST_INTERVAL,
    MAX_INTERVAL,
    PROBE_SAMPLES,
    RECHECK,
    CpuLoad,
    Pinned,
    ThreadTuner,
    candidates,
    threads_setting,
)
from quark.generate import generate


class FakeMachine:
    """A clock and a step whose duration depends on the thread count torch is set to when it runs."""

    def __init__(self, cost: dict[int, float]):
        self.cost, self.now, self.seen = cost, 0.0, []

    def clock(self) -> float:
        return self.now

    def step(self):
        n = torch.get_num_threads()
        self.seen.append(n)
        self.now += self.cost[n]
        return n


def unknown_load():
    return None  # no /proc/stat reading: every count is probed


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_setting_and_candidates(monkeypatch):
    monkeypatch.delenv("QUARK_THREADS", raising=False)
    assert threads_setting() is None
    monkeypatch.setenv("QUARK_THREADS", "3")
    assert threads_setting() == 3
    monkeypatch.setenv("QUARK_THREADS", "many")
    with pytest.raises(ValueError, match="QUARK_THREADS='many': allowed values are auto or a positive integer"):
        threads_setting()
    assert candidates(2) == [1, 2] and candidates(16) == [1, 8, 16] and candidates(1) == [1]


def test_tuner_settles_follows_contention_and_backs_off(two_threads):
    m = FakeMachine({2: 1.0, 1: 1.6})  # idle: two threads win
    tuner = ThreadTuner(2, clock=m.clock, load=unknown_load)
    for _ in range(200):
        assert tuner.run(m.step) in (1, 2)
    tuner.release()
    assert torch.get_num_threads() == 2  # the count it found
    assert tuner.best == 2 and m.seen[-40:].count(2) >= 36
    assert tuner.interval > FIRST_INTERVAL  # two threads keep winning: probes spaced further apart
    # after the first round, a probe of one thread ends after two steps (1.6x > CUT)
    later = "".join(map(str, m.seen[8:]))
    assert later.count("11") >= 1 and "111" not in later
    m.cost = {2: 4.0, 1: 1.0}  # a competing process holds a core: spinning workers collapse
    m.seen.clear()
    for _ in range(12):  # the winner's own steps turned slower: a probe at once, not at the next interval
        tuner.run(m.step)
    assert tuner.best == 1 and m.seen[-4:] == [1, 1, 1, 1] and tuner.interval == FIRST_INTERVAL
    m.seen.clear()
    for _ in range(3000):
        tuner.run(m.step)
    assert tuner.interval == MAX_INTERVAL  # two threads keep losing 4x: probed ever more rarely
    assert m.seen.count(2) <= 16  # each probe is two 4x steps
    m.cost = {2: 1.0, 1: 1.6}  # the other process is gone: found at the next probe
    for _ in range(MAX_INTERVAL + 10):
        tuner.run(m.step)
    assert tuner.best == 2


def test_a_slow_first_step_at_a_count_does_not_disqualify_it(two_threads):
    """The first step at a new thread count can take seconds (quark/fast.py compiles its CPU step per count): the
    probe goes on, and that count wins if its later steps are faster."""

    class Compiling(FakeMachine):
        def step(self):
            n = torch.get_num_threads()
            first = n not in self.seen
            out = super().step()
            self.now += 200.0 if first else 0.0
            return out

    m = Compiling({2: 1.0, 1: 1.6})
    tuner = ThreadTuner(2, clock=m.clock, load=unknown_load)
    for _ in range(40):
        tuner.run(m.step)
    assert tuner.best == 2 and m.seen[-20:].count(2) >= 19


def test_one_slow_step_does_not_end_a_probe(two_threads):
    """A single hiccup (another process's burst) in a probe of the faster count: the probe goes on and that count
    still wins; two slow steps in a row end it."""

    class Hiccup(FakeMachine):
        def step(self):
            out = super().step()
            if len(self.seen) == 7:  # the second step of the probe of one thread (after its compile step)
                self.now += 50.0
            return out

    m = Hiccup({2: 1.6, 1: 1.0})
    tuner = ThreadTuner(2, clock=m.clock, load=unknown_load)
    for _ in range(30):
        tuner.run(m.step)
    assert m.seen[:5] == [2, 2, 2, 2, 1] and tuner.best == 1 and m.seen[-20:].count(1) == 20


def test_counts_other_processes_leave_no_cores_for_are_not_probed(two_threads):
    """A round starts at the most threads the free cores allow; while another process keeps the second core busy,
    two threads are never run (a probe there costs a stream its wake-up stall), whatever they measured before;
    when the core frees up, the next round probes them again."""
    busy = [0.0]
    m = FakeMachine({2: 1.0, 1: 1.6})
    tuner = ThreadTuner(2, clock=m.clock, load=lambda: busy[0])
    for _ in range(20):
        tuner.run(m.step)
    assert m.seen[:4] == [2, 2, 2, 2] and tuner.best == 2  # idle: all cores from the first step
    busy[0] = 1.0
    m.cost = {2: 4.0, 1: 1.0}
    m.seen.clear()
    for _ in range(2000):
        tuner.run(m.step)
    assert tuner.best == 1 and m.seen.count(2) <= 3  # the steps that found the winner slower, then never again
    m.seen.clear()
    m.cost = {2: 1.0, 1: 1.6}  # 2 is faster again, but the reading says the core is still busy
    for _ in range(2000):
        tuner.run(m.step)
    assert m.seen.count(2) == 0
    busy[0] = 0.1  # the other process is gone: within RECHECK steps a round probes two threads, and they win
    m.seen.clear()
    for _ in range(RECHECK + 2 * PROBE_SAMPLES + 2):
        tuner.run(m.step)
    assert tuner.best == 2 and m.seen[-2:] == [2, 2]
    fresh = ThreadTuner(2, clock=m.clock, load=lambda: 0.9)  # a new tuner on a busy machine: one thread only
    m.seen.clear()
    for _ in range(100):
        fresh.run(m.step)
    assert set(m.seen) == {1}


def test_cpu_load_counts_other_processes_not_ours():
    """CpuLoad on the real machine, beside a CPU-bound child while our own thread is busy too: it counts the CPU
    time the child used (read from /proc/<pid>/stat) and not ours (others + ours fit in the cores). Other work on
    the machine may add to the reading, never take from it."""
    if not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux /proc/stat and two cores")

    def cpu_seconds(pid: int) -> float:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        load = CpuLoad()
        t0, child0, own0 = time.perf_counter(), cpu_seconds(p.pid), time.process_time()
        while time.perf_counter() - t0 < 0.4:
            sum(range(1000))
        others = load.others()
        wall = time.perf_counter() - t0
        child, own = (cpu_seconds(p.pid) - child0) / wall, (time.process_time() - own0) / wall
    finally:
        p.kill()
        p.wait()
    assert others is not None and others >= child - 0.15, (others, child)
    assert others + own <= len(os.sched_getaffinity(0)) + 0.15, (others, own)
    assert load.others() == others  # asked again within MIN_WINDOW: the same answer


def test_pinned_restores_count(two_threads):
    m = FakeMachine({1: 1.0, 2: 1.0})
    p = Pinned(1)
    assert p.run(m.step) == 1
    p.release()
    assert torch.get_num_threads() == 2


def test_tuned_and_pinned_decoding_give_the_same_tokens(monkeypatch, two_threads):
    model = Quark(PRESETS["test"].replace(init_std=0.3)).init_weights(seed=5).eval()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]
    out = {}
    for setting in ("1", "2", "auto"):
        monkeypatch.setenv("QUARK_THREADS", setting)
        out[setting] = generate(model, prompts, max_new_tokens=40, temperature=0.0)
        out[setting + " one row"] = generate(model, prompts[:1], max_new_tokens=40, temperature=0.0)
    assert torch.get_num_threads() == 2  # a finished generation leaves torch's count as it was
    assert out["1"] == out["2"] == out["auto"]
    assert out["1 one row"] == out["2 one row"] == out["auto one row"] == out["1"][:1]
