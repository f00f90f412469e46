"""Scored items per second on the CPU: `quark eval`'s harness vs lm-evaluation-harness, same model, same items.

    OMP_NUM_THREADS=1 python bench/eval.py                    # tiny preset, piqa,arc_easy,hellaswag, 100 items each
    OMP_NUM_THREADS=1 python bench/eval.py --limit 300 --threads 2

The model is random weights of the `tiny` preset (4 layers, d_model 256, vocabulary 8,192 + 2) with a tokenizer
trained on the stdlib; its context is widened to 512 because lm-eval refuses continuations longer than the context.
Both sides start from a loaded model (lm-eval gets an `HFLM` wrapping `LlamaForCausalLM` loaded from the `quark
export --format llama` folder) and run the same tasks with the same --limit and --batch-size, timed from loading the
items to the final scores, in the same process, best of --rounds interleaved rounds. lm-eval reads the items through
the local task YAMLs in bench/lm_eval_tasks. The scores of both are printed too (they agree: see
bench/eval_agreement.py).
Target: >= 2x lm-eval.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "lm_eval_tasks"))
import local


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--context-length", type=int, default=512)
    ap.add_argument("--tasks", default="piqa,arc_easy,hellaswag")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds, best kept (default 2)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args(argv)
    os.environ.update(local.OFFLINE_ENV)
    import torch

    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = local.render_tasks(tmp / "tasks")
        ours_dir, llama_dir = local.make_model(tmp, args.preset, context_length=args.context_length)

        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from quark.eval.harness import evaluate
        from quark.eval.tasks import build_items, load_docs
        from quark.weights import load_model_and_tokenizer

        n_items = sum(len(build_items(t, args.limit)) for t in tasks)
        n_reqs = sum(len(it.requests) for t in tasks for it in build_items(t, args.limit))

        model, tok = load_model_and_tokenizer(ours_dir)
        lm = HFLM(pretrained=str(llama_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
        scoring_s = [0.0]
        inner = lm._loglikelihood_tokens

        def timed(*a, **kw):  # lm-eval's scoring alone (model forward passes), without task/data set-up
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                scoring_s[0] += time.perf_counter() - t
        lm._loglikelihood_tokens = timed
        tm = TaskManager(include_path=str(tmp / "tasks"))
        # interleaved rounds, best of each: the CPU is shared, so a single pair of timings can be skewed by load
        t_ours = t_theirs = s_ours = s_theirs = math.inf
        for _ in range(args.rounds):
            load_docs.cache_clear()
            t0 = time.perf_counter()
            ours = evaluate(model, tok, tasks, limit=args.limit, batch_size=args.batch_size, progress=False)
            t_ours = min(t_ours, time.perf_counter() - t0)
            s_ours = min(s_ours, sum(r["seconds"] for r in ours.values()))
            scoring_s[0] = 0.0
            t0 = time.perf_counter()
            theirs = simple_evaluate(model=lm, tasks=[names[t] for t in tasks], num_fewshot=0, limit=args.limit,
                                     task_manager=tm, bootstrap_iters=0)
            t_theirs = min(t_theirs, time.perf_counter() - t0)
            s_theirs = min(s_theirs, scoring_s[0])

    print(f"\n{args.preset} preset (context {args.context_length}), random weights, fp32 CPU, "
          f"{args.threads} thread(s), "
          f"batch {args.batch_size}, best of {args.rounds} interleaved rounds; tasks {args.tasks}, {args.limit} items "
          f"each: {n_items} items, {n_reqs} requests")
    for t in tasks:
        r = theirs["results"][names[t]]
        print(f"  {t:10s} acc {100 * ours[t]['acc']:6.2f} (lm-eval {100 * r['acc,none']:6.2f})  acc_norm "
              f"{100 * ours[t]['acc_norm']:6.2f} (lm-eval {100 * r['acc_norm,none']:6.2f})")
    a, b = n_items / t_ours, n_items / t_theirs
    print(f"quark eval:               {t_ours:7.2f} s  {a:8.1f} items/s")
    print(f"lm-evaluation-harness {local.lm_eval_version()}: {t_theirs:7.2f} s  {b:8.1f} items/s")
    print(f"speed-up: {a / b:.2f}x (target >= 2x)")
    print(f"scoring alone (forward passes, no item loading): quark {s_ours:.2f} s, lm-eval {s_theirs:.2f} s "
          f"-> {s_theirs / s_ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
