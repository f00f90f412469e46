"""The decode thread rule (quark/cpu_settings.py): steps run on the cores other processes leave free, looked at
again every RECHECK steps; QUARK_THREADS pins the count; torch's count is restored; the tokens never change."""

import os
import subprocess
import sys
import time

import pytest
import torch

from quark import Quark
from quark.config import PRESETS
from quark.cpu_settings import RECHECK, CpuLoad, Threads, threads_setting
from quark.generate import generate


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_setting(monkeypatch):
    monkeypatch.delenv("QUARK_THREADS", raising=False)
    assert threads_setting() is None
    monkeypatch.setenv("QUARK_THREADS", "3")
    assert threads_setting() == 3
    monkeypatch.setenv("QUARK_THREADS", "many")
    with pytest.raises(ValueError, match="allowed values are auto or a positive integer"):
        threads_setting()


def test_rule_follows_the_free_cores_and_restores_torch_count(monkeypatch, two_threads):
    """Idle: all of torch's threads; another process on a core: one; it leaves: back to two within RECHECK steps.
    Unknown load (no /proc/stat): torch's count. Pinned: that count whatever the load."""
    monkeypatch.delenv("QUARK_THREADS", raising=False)
    monkeypatch.setattr("quark.cpu_settings._IMPORTED.cpus", {0, 1})
    busy = [0.02]
    threads = Threads(load=lambda: busy[0])
    seen = [threads.run(torch.get_num_threads) for _ in range(RECHECK)]
    busy[0] = 0.95  # a process arrives
    seen += [threads.run(torch.get_num_threads) for _ in range(2 * RECHECK)]
    busy[0] = 0.1  # and leaves
    seen += [threads.run(torch.get_num_threads) for _ in range(2 * RECHECK)]
    assert seen == [2] * RECHECK + [1] * 2 * RECHECK + [2] * 2 * RECHECK
    readings = (None, 0.0, 0.29, 0.31, 1.9, 5.0)
    assert [Threads(load=lambda b=b: b).count() for b in readings] == [2, 2, 2, 1, 1, 1]
    threads.release()
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("QUARK_THREADS", "1")
    pinned = Threads(load=lambda: 0.0)
    assert pinned.run(torch.get_num_threads) == 1
    pinned.release()
    assert torch.get_num_threads() == 2


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


def test_rule_and_pinned_decoding_give_the_same_tokens(monkeypatch, two_threads):
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
