"""AdamW vs Muon on the tiny preset: the same data, seed and schedule, at a fixed token budget and a fixed wall-clock
budget, with a small learning-rate sweep.

    OMP_NUM_THREADS=1 python bench/recipe.py --data RUN/data --tokenizer RUN/tokenizer   # a speedrun's folders
    OMP_NUM_THREADS=1 python bench/recipe.py --data D --tokens 400000 --minutes 3 --adamw-lrs 3e-3,6e-3 \
        --muon-lrs 3e-3,1e-2,2e-2

Every run is an ordinary `quark pretrain --config pretrain-tiny` child process (so it measures the shipped loop and
config, `--set` only changing the budget, the optimizer and its learning rate), evaluated every `--eval-every`
steps on the same validation windows. Printed per run: validation loss and bits/byte at the end, and the tokens it
needed to reach the best AdamW run's final validation loss (linear interpolation between evaluations; "—" when
never reached). Then the best AdamW and the best Muon learning rate each train for `--minutes` of wall clock.
The peer is AdamW, the optimizer the card's recipe shipped with. Target: Muon reaches AdamW's loss in <= 0.75x
the tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(data: str, tokenizer: str | None, out: Path, optimizer: str, lr: float, budget: list[str], eval_every: int,
        threads: int) -> dict:
    """Train one configuration; {"val": [(tokens, val_loss, val_bpb)], "final": ..., "seconds": ...}."""
    sets = [f"optimizer={optimizer}", f"eval_every={eval_every}", "eval_batches=4", "save_every=0", "samples=0",
            "tensorboard=false", "plot=false", "log_every=5", *budget]
    sets.append(f"muon_lr={lr}" if optimizer == "muon" else f"lr={lr}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "quark", "pretrain", "--config", "pretrain-tiny", "--data", data, "--out", str(out)]
    cmd += ["--tokenizer", tokenizer] if tokenizer else []
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((out / "run.json").read_text())
    per_step = info["tokens"] / info["steps"]
    val = [(x["step"] * per_step, x["val_loss"], x["val_bpb"]) for x in recs if "val_loss" in x]
    return {"val": val, "final": val[-1], "seconds": time.time() - t0}


def tokens_to_reach(val: list[tuple], target: float) -> float | None:
    """Tokens at which the validation curve first reaches `target` (interpolated), None if it never does."""
    prev = (0.0, float("inf"))
    for tok, loss, _ in val:
        if loss <= target:
            if prev[1] == float("inf"):
                return tok
            return prev[0] + (tok - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (tok, loss)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a `quark prepare` pre-training folder for the tiny preset")
    ap.add_argument("--tokenizer", help="its tokenizer, when the data folder holds none (the speedrun's RUN/tokenizer)")
    ap.add_argument("--tokens", type=int, default=250_000, help="token budget of the sweep runs (default 250k)")
    ap.add_argument("--minutes", type=float, default=2.0, help="wall-clock budget of the final pair (default 2)")
    ap.add_argument("--adamw-lrs", default="3e-3,6e-3")
    ap.add_argument("--muon-lrs", default="3e-3,1e-2,2e-2", help="Muon's peak lr (AdamW-matched scale)")
    ap.add_argument("--eval-every", type=int, default=6, help="optimizer steps between validations")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    args = ap.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="quark-recipe-"))
    rows = {}
    for opt, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
        for lr in (float(x) for x in lrs.split(",")):
            name = f"{opt} lr={lr:g}"
            rows[name] = run(args.data, args.tokenizer, root / f"{opt}-{lr:g}", opt, lr, [f"max_tokens={args.tokens}"],
                             args.eval_every, args.threads)
            print(f"{name}: val loss {rows[name]['final'][1]:.4f} in {rows[name]['seconds']:.0f} s", flush=True)
    best = {o: min((k for k in rows if k.startswith(o)), key=lambda k: rows[k]["final"][1]) for o in ("adamw", "muon")}
    target = rows[best["adamw"]]["final"][1]
    print(f"\ntiny preset, pretrain-tiny config, {args.tokens:,}-token budget, {args.threads} thread(s), "
          f"torch {__import__('torch').__version__}; data {args.data}")
    print(f"| run | val loss | val bits/byte | tokens to reach {target:.4f} (best AdamW's final) | x AdamW | s |")
    print("|---|---:|---:|---:|---:|---:|")
    base_tokens = tokens_to_reach(rows[best["adamw"]]["val"], target)
    for name, r in rows.items():
        t = tokens_to_reach(r["val"], target)
        ratio = f"{t / base_tokens:.2f}" if t and base_tokens else "—"
        print(f"| {name} | {r['final'][1]:.4f} | {r['final'][2]:.4f} | {f'{t:,.0f}' if t else '—'} | {ratio} | "
              f"{r['seconds']:.0f} |")
    print(f"\nfixed wall clock: {args.minutes:g} minutes each, best learning rates")
    print("| run | val loss | val bits/byte | tokens |")
    print("|---|---:|---:|---:|")
    for o in ("adamw", "muon"):
        lr = float(best[o].split("=")[1])
        r = run(args.data, args.tokenizer, root / f"{o}-time", o, lr, [f"max_minutes={args.minutes}"],
                args.eval_every * 4, args.threads)
        print(f"| {best[o]} | {r['final'][1]:.4f} | {r['final'][2]:.4f} | {r['final'][0]:,.0f} |", flush=True)
    print(f"run folders: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
