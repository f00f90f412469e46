"""bench/gpu.py is run on a lent GPU with minutes of budget, so its CPU dry run must pass here: every section
(ours and HF, training and decode, the smoke run) runs on small shapes and no section reports an error."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_dry_run_has_no_errors():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "ERROR" not in out, out[-3000:]
    assert "train tok/s" in out and "decode tok/s bs1" in out and "fast path vs plain path" in out
