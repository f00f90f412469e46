"""Replay issue 36's independent-probe cases (tests/test_probe_*.py, one test per case) and print tried / clean /
failed per area. Each case failed on c81157c, the commit the probe broke; CI runs the same files in the suite.

    python bench/probe.py            # all areas
    python bench/probe.py -k serve   # pytest's -k passes through
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AREAS = {  # test file -> the probe's findings it replays
    "test_probe_build_cli.py": "kernel build lock, no compiler, CLI edges (1, 7, 9)",
    "test_probe_serve.py": "sampling, worker health, server edges (2, 3, 8)",
    "test_probe_data_train.py": "SFT data, training state (4, 6)",
    "test_probe_model_folder.py": "model folders (5)",
}


class Tally:
    def __init__(self):
        self.counts: dict[str, Counter] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        name = Path(report.nodeid.split("::")[0]).name
        c = self.counts.setdefault(name, Counter())
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            c["tried"] += 1
            c[{"passed": "clean", "failed": "failed", "skipped": "skipped"}[report.outcome]] += 1


def main(argv: list[str]) -> int:
    tally = Tally()
    files = [str(ROOT / "tests" / f) for f in AREAS]
    rc = pytest.main(["-q", "-p", "no:cacheprovider", *files, *argv], plugins=[tally])
    print("\n| area | findings | tried | clean | failed | skipped |\n|---|---|---:|---:|---:|---:|")
    total = Counter()
    for f, what in AREAS.items():
        c = tally.counts.get(f, Counter())
        total.update(c)
        print(f"| {f.removeprefix('test_probe_').removesuffix('.py')} | {what} | {c['tried']} | {c['clean']} | "
              f"{c['failed']} | {c['skipped']} |")
    print(f"| all | | {total['tried']} | {total['clean']} | {total['failed']} | {total['skipped']} |")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
