"""Decode threads: the free-cores rule (quark/cpu_settings.py) against the run-time tuner it replaced, same run.

    PYTHONPATH=. python bench/threads.py --model runs/bench-llamacpp/quark-72m-random

The tuner (`ThreadTuner`, quark/cpu_settings.py at c81157c, loaded from git) probed one / half / all cores and kept
the fastest by measured step times; the rule runs on the cores other processes leave free, re-read every RECHECK
steps. Both drive the same decoder (the serving engine's, as `quark.load`, chat and serve decode), greedy, 8-token
prompt, `--new-tokens`, batch 1 and 8, int8 and fp32, idle and beside a `while True` process; each measurement in
its own process, alternating, best of `--rounds`. The rule stays unless the tuner beats it by >= 10% somewhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
TUNER_COMMIT = "c81157c"


def old_tuner():
    """The tuner's module as it was at TUNER_COMMIT (it imports only torch)."""
    text = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{TUNER_COMMIT}:quark/cpu_settings.py"],
                          capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_cpu_settings.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_cpu_settings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worker(spec: dict) -> dict:
    import torch

    from quark.quantize import quantize_int8
    from quark.serve.engine import Engine, SamplingParams
    from quark.weights import load_model

    model = load_model(spec["model"], device="cpu", dtype=torch.float32).eval()
    if spec["precision"] == "int8":
        model = quantize_int8(model)
    engine = Engine(model, stop_ids=[], max_batch=spec["batch"])
    if spec["runner"] == "tuner":
        tuner = old_tuner().ThreadTuner()
        tuner.compiled_at(tuner.cands)  # quark's kernels compile nothing: every step is measured
        engine.dec.threads = tuner
    prompts = [[1 + (97 * r + 31 * i) % 60000 for i in range(8)] for r in range(spec["batch"])]

    def run(n: int) -> None:
        reqs = [engine.submit(p, SamplingParams(n, 0.0, 1.0, 1.0)) for p in prompts]
        for r in reqs:
            list(engine.iter_tokens(r))

    run(8)
    t0 = time.perf_counter()
    run(spec["new_tokens"])
    return {"tok_s": spec["batch"] * spec["new_tokens"] / (time.perf_counter() - t0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precisions", default="int8,fp32")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    print(f"# bench/threads.py {args.model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"{args.new_tokens} new tokens, best of {args.rounds}")
    best: dict = {}
    for phase in ("idle", "shared"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if phase == "shared" else None
        try:
            for r in range(args.rounds):
                for precision in args.precisions.split(","):
                    for batch in (1, 8):
                        runners = ("rule", "tuner") if r % 2 == 0 else ("tuner", "rule")
                        for runner in runners:
                            spec = {"model": args.model, "precision": precision, "batch": batch, "runner": runner,
                                    "new_tokens": args.new_tokens}
                            p = subprocess.run([sys.executable, str(HERE), "--model", args.model, "--worker",
                                                json.dumps(spec)], capture_output=True, text=True)
                            got = json.loads(p.stdout.strip().splitlines()[-1])["tok_s"] if p.returncode == 0 else 0
                            key = (phase, precision, batch, runner)
                            best[key] = max(best.get(key, 0.0), got)
                            print(f"# {phase} round {r + 1} {precision} b{batch} {runner}: {got:.1f}", flush=True)
        finally:
            if busy:
                busy.kill()
                busy.wait()
    print("\n| phase | precision | batch | rule tok/s | tuner tok/s | tuner / rule |\n|---|---|---:|---:|---:|---:|")
    for (phase, precision, batch, runner), v in best.items():
        if runner == "rule":
            t = best[(phase, precision, batch, "tuner")]
            print(f"| {phase} | {precision} | {batch} | {v:.1f} | {t:.1f} | {t / v:.2f}x |")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
