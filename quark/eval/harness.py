"""Run tasks on a model: build items, tokenize, score, aggregate; plus validation perplexity and the report.

Choices:
- One progress bar over every request of every task; scores are aggregated per task as lm-eval aggregates them
  (mean of per-item acc / acc_norm with `mean_stderr`; LAMBADA: acc = continuation is greedy, perplexity =
  exp(-mean log-likelihood)).
- Perplexity reads the pre-training val shards of a `quark prepare` data folder through the training loader
  (non-overlapping windows of context_length + 1 tokens), so the number is the one `quark pretrain` reports;
  bits-per-byte converts with the split's token and byte counts from the manifest.
- The result file follows the eval-results contract and is written atomically; a Markdown table goes beside it.
  A NaN/Inf log-likelihood or validation loss is an error (exit 2), never a result.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .scoring import encode_pair, item_metrics, mean_stderr, score_tokens
from .tasks import build_items, task_spec


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a core dependency; stay usable without it
        return None
    return tqdm(total=total, unit="req", desc="scoring", dynamic_ncols=True)


def request_tokens(tokenizer, items, cache: dict | None = None) -> list[tuple[list[int], list[int]]]:
    """Every request of every item, tokenized as lm-eval's HF model does, in item then choice order."""
    cache = {} if cache is None else cache
    return [encode_pair(tokenizer.encode, c, x, cache) for it in items for c, x in it.requests]


def evaluate(model, tokenizer, tasks: list[str], *, limit: int | None = None, fewshot: int = 0, seed: int = 1234,
             batch_size: int = 32, progress: bool = True, data_root: str | None = None, chat: bool = False,
             arith_dedup: list | None = None) -> dict[str, dict]:
    """{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "chance", "split", ...}} for a model.
    Generative tasks (gsm8k, humaneval, arith) go to `quark.eval.generative` (chat prompts when `chat`)."""
    from .generative import GEN_TASKS, run_generative

    gen = [t for t in tasks if t in GEN_TASKS]
    results = evaluate_choices(model, tokenizer, [t for t in tasks if t not in GEN_TASKS], limit=limit,
                               fewshot=fewshot, seed=seed, batch_size=batch_size, progress=progress,
                               data_root=data_root)
    if gen:
        results.update(run_generative(model, tokenizer, gen, limit=limit, fewshot=fewshot, seed=seed,
                                      batch_size=max(1, batch_size // 2), progress=progress, chat=chat,
                                      arith_dedup=arith_dedup))
    return {t: results[t] for t in tasks}


def evaluate_choices(model, tokenizer, tasks: list[str], *, limit: int | None = None, fewshot: int = 0,
                     seed: int = 1234, batch_size: int = 32, progress: bool = True,
                     data_root: str | None = None) -> dict[str, dict]:
    """The log-likelihood (multiple-choice, LAMBADA) tasks of `evaluate`."""
    if not tasks:
        return {}
    built = {t: build_items(t, limit, fewshot, seed, data_root) for t in tasks}
    token_cache: dict[str, list[int]] = {}
    token_reqs = {t: request_tokens(tokenizer, items, token_cache) for t, items in built.items()}
    bar = _progress_bar(sum(len(r) for r in token_reqs.values()), progress)
    results = {}
    try:
        for t, items in built.items():
            if bar is not None:
                bar.set_description(t)
            t0 = time.perf_counter()
            scores = score_tokens(model, token_reqs[t], batch_size, bar.update if bar is not None else None)
            bad = [ll for ll, _ in scores if not math.isfinite(ll)]
            if bad:
                raise ValueError(f"task {t}: the log-likelihood is {bad[0]} (NaN/Inf) for {len(bad)} of {len(scores)} "
                                 "requests: the model's weights overflow; nothing was written")
            results[t] = aggregate(t, items, scores)
            results[t]["seconds"] = round(time.perf_counter() - t0, 3)
    finally:
        if bar is not None:
            bar.close()
    return results


def aggregate(task: str, items, scores: list[tuple[float, bool]]) -> dict:
    spec = task_spec(task)
    res: dict = {"n": len(items), "chance": spec.chance, "split": spec.split}
    if spec.kind == "loglikelihood":
        lls = [ll for ll, _ in scores]
        acc = [float(g) for _, g in scores]
        res.update(acc=sum(acc) / len(acc), acc_stderr=mean_stderr(acc), acc_norm=None, acc_norm_stderr=None,
                   perplexity=math.exp(-sum(lls) / len(lls)))
        return res
    accs, norms, k = [], [], 0
    for it in items:
        n = len(it.requests)
        a, an = item_metrics([ll for ll, _ in scores[k:k + n]], it.gold, it.norm_chars)
        accs.append(a)
        norms.append(an)
        k += n
    res.update(acc=sum(accs) / len(accs), acc_stderr=mean_stderr(accs))
    if spec.acc_norm:
        res.update(acc_norm=sum(norms) / len(norms), acc_norm_stderr=mean_stderr(norms))
    else:
        res.update(acc_norm=None, acc_norm_stderr=None)
    return res


@torch.inference_mode()
def perplexity(model, data_dir: str | Path, batch_size: int = 8, max_windows: int | None = None,
               split: str = "val", seq_len: int | None = None) -> dict:
    """{"val_loss", "bpb", "tokens"} over the pre-training `split` shards of a data folder, in windows of `seq_len`
    tokens (default the model's context), the first `max_windows` of them (default all)."""
    from ..data.loader import PretrainLoader, read_manifest
    from ..train.metrics import bits_per_byte, summed_loss

    manifest = read_manifest(data_dir)
    if manifest["kind"] != "pretrain":
        raise ValueError(f"{data_dir}: perplexity needs a pre-training data folder (kind 'pretrain'), "
                         f"found kind {manifest['kind']!r}")
    loader = PretrainLoader(data_dir, split, seq_len or model.config.context_length, batch_size, manifest=manifest,
                            vocab_size=model.config.vocab_size)  # ids >= vocab_size fail naming the shard
    n_windows = len(loader) if max_windows is None else min(len(loader), max_windows)
    total, n_tok = summed_loss(model, loader.val_batches(math.ceil(n_windows / batch_size)))
    loss = total / max(n_tok, 1)
    if not math.isfinite(loss):
        raise ValueError(f"{data_dir}: the validation loss over the {split} split is {loss} (NaN/Inf): the model's "
                         "weights overflow on this data; nothing was written. Evaluate an earlier checkpoint")
    info = manifest["splits"].get(split, {})
    return {"val_loss": loss, "bpb": bits_per_byte(loss, info.get("tokens"), info.get("bytes")), "tokens": n_tok}


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def markdown_table(results: dict) -> str:
    """Scores beside their chance baselines, as a Markdown table."""
    lines = ["| task | split | n | acc | ± | acc_norm | ± | chance |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for t, r in results.get("tasks", {}).items():
        extra = f" (ppl {r['perplexity']:.2f})" if r.get("perplexity") is not None else ""
        lines.append(f"| {t} | {r['split']} | {r['n']} | {_pct(r['acc'])}{extra} | {_pct(r['acc_stderr'])} | "
                     f"{_pct(r['acc_norm'])} | {_pct(r['acc_norm_stderr'])} | {_pct(r['chance'])} |")
    p = results.get("perplexity")
    if p:
        bpb = "—" if p["bpb"] is None else f"{p['bpb']:.4f}"
        lines += ["", f"Validation loss {p['val_loss']:.4f} nats/token, {bpb} bits/byte over {p['tokens']:,} tokens."]
    from .generative import groups_table, metrics_note

    return "\n".join(lines) + "\n" + metrics_note(results) + groups_table(results)
