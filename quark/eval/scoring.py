"""Log-likelihood scoring of (context, continuation) requests, with each shared context run once.

Choices:
- Tokenization is lm-evaluation-harness's `_encode_pair` for causal models: trailing spaces of the context move
  to the continuation, the whole string is encoded, and the continuation is what follows the encoded context.
  Too-long requests are cut from the left exactly as its HF model does (`(ctx + cont)[-(max_len + 1):]`).
- Requests are grouped by their (token) context. A batch first runs each distinct context once, right-padded,
  writing a KV cache (`key_mask` hides the padding); the cache rows are then repeated for every choice of that
  context and only the continuation tokens run, with per-row positions. A 4-choice HellaSwag item therefore
  costs one context pass instead of four. Contexts are batched longest first; inside a batch the continuations
  are re-bucketed by length, since padding them all to the longest one was half of the work.
- Logits are formed only where a continuation token is predicted (the last context position and the
  continuation's own positions), never for the whole sequence: the (tokens x vocab) head dominates small models.
- Metrics follow lm-eval: acc = argmax of summed log-likelihood, acc_norm = argmax of log-likelihood / len(choice)
  in characters, standard error = sample standard deviation / sqrt(n).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..model import KVCache, Quark


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                cache: dict | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HF model splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        raise ValueError("an evaluation request has an empty context")
    whole = encode(context + continuation)
    if cache is not None:
        ctx = cache.get(context)
        if ctx is None:
            ctx = cache[context] = encode(context)
    else:
        ctx = encode(context)
    return whole[:len(ctx)], whole[len(ctx):]


def truncate(ctx: list[int], cont: list[int], max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Cut from the left so the model input (ctx + cont minus its last token) fits max_len, as lm-eval does."""
    if not cont:
        raise ValueError("an evaluation request has an empty continuation after tokenization")
    whole = ctx + cont
    if len(whole) > max_len + 1:
        whole = whole[-(max_len + 1):]
        n_ctx = max(1, len(whole) - len(cont))  # keep one conditioning token when the continuation is too long
        return tuple(whole[:n_ctx]), tuple(whole[n_ctx:])
    return tuple(ctx), tuple(cont)


def _batches(groups: list[tuple[tuple[int, ...], list[int]]], conts: list[tuple[int, ...]], batch_size: int,
             max_len: int):
    """Consecutive groups whose rows fit batch_size and whose widest context + longest continuation fit max_len."""
    batch, rows, wctx, wcont = [], 0, 0, 0
    for g in groups:
        ctx, reqs = g
        gc = max(len(conts[r]) for r in reqs)
        if batch and (rows + len(reqs) > batch_size or max(wctx, len(ctx)) + max(wcont, gc) - 1 > max_len):
            yield batch
            batch, rows, wctx, wcont = [], 0, 0, 0
        batch.append(g)
        rows, wctx, wcont = rows + len(reqs), max(wctx, len(ctx)), max(wcont, gc)
    if batch:
        yield batch


@torch.inference_mode()
def score_tokens(model: Quark, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 32,
                 progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is the greedy choice) for each token request."""
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} must be >= 1")
    max_len = model.config.context_length
    dev = model.device
    pairs = [truncate(list(c), list(x), max_len) for c, x in requests]
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        by_ctx.setdefault(ctx, []).append(i)
    conts = [x for _, x in pairs]
    # longest context first: similar contexts share a batch (continuations are re-bucketed inside a batch), and an
    # out-of-memory shows up at once
    groups = sorted(by_ctx.items(), key=lambda g: (-len(g[0]), -max(len(conts[r]) for r in g[1])))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    for batch in _batches(groups, conts, batch_size, max_len):
        for r, res in zip([r for _, reqs in batch for r in reqs], _score_batch(model, batch, conts, dev)):
            out[r] = res
        if progress:
            progress(sum(len(reqs) for _, reqs in batch))
    return out  # type: ignore[return-value]


def _score_batch(model: Quark, batch: list, conts: list[tuple[int, ...]], dev: torch.device) -> list[tuple[float, bool]]:
    B = len(batch)
    ctx_lens = torch.tensor([len(c) for c, _ in batch], device=dev)
    row_group = [gi for gi, (_, reqs) in enumerate(batch) for _ in reqs]
    row_conts = [conts[r] for _, reqs in batch for r in reqs]
    Tc = int(ctx_lens.max())
    width = Tc + max(len(x) for x in row_conts) - 1  # cache slots: widest context + longest continuation input
    slots = torch.arange(width, device=dev)

    # 1) each distinct context once: right-padded, pads hidden from every query by key_mask
    idx = torch.zeros(B, Tc, dtype=torch.long)  # built on the host, moved once
    for b, (c, _) in enumerate(batch):
        idx[b, :len(c)] = torch.tensor(c)
    idx = idx.to(dev)
    cache = KVCache(model.config, B, width, device=dev, dtype=model.dtype)
    h = model.hidden(idx, cache, 0, key_mask=slots[None] < ctx_lens[:, None], n_keys=Tc)
    last = h[torch.arange(B, device=dev), ctx_lens - 1]  # (B, d): predicts each continuation's first token
    first_lp = F.log_softmax(model.lm_head(last).float(), dim=-1)  # (B, V)

    rows = torch.tensor(row_group, device=dev)
    first_tok = torch.tensor([x[0] for x in row_conts]).to(dev)
    lp = first_lp[rows, first_tok]  # (R,)
    greedy = lp >= first_lp.amax(-1)[rows]  # the continuation's token is the argmax (amax: 4x faster on CPU)

    # 2) the continuations (minus their last token) of every choice, on a copy of its context's cache rows
    long_rows = sorted((i for i, x in enumerate(row_conts) if len(x) > 1), key=lambda i: -len(row_conts[i]))
    for chunk in _similar_lengths(long_rows, [len(x) - 1 for x in row_conts]):
        lr = torch.tensor(chunk, device=dev)
        c_lp, c_greedy = _score_continuations(model, cache, rows[lr], ctx_lens, [row_conts[i] for i in chunk])
        lp[lr] += c_lp
        greedy[lr] &= c_greedy
    return [(float(a), bool(g)) for a, g in zip(lp.double().cpu(), greedy.cpu())]


def _similar_lengths(order: list[int], lengths: list[int], slack: float = 0.1, free: int = 48):
    """Split rows (sorted longest first) into runs whose padding stays within `slack` of their real tokens (or
    `free` tokens, cheaper than another forward call): a batch mixing one long continuation with many short ones
    would otherwise spend most of its work on padding."""
    chunk: list[int] = []
    real = 0
    for i in order:
        padded = (len(chunk) + 1) * lengths[chunk[0]] if chunk else 0
        if chunk and padded - real - lengths[i] > max(free, slack * (real + lengths[i])):
            yield chunk
            chunk, real = [], 0
        chunk.append(i)
        real += lengths[i]
    if chunk:
        yield chunk


def _score_continuations(model: Quark, cache: KVCache, sel: torch.Tensor, ctx_lens: torch.Tensor,
                         conts: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum log-probs and all-greedy flags of continuation tokens 1.. of each row, on copies of the cache rows
    `sel` (their contexts). Row r's tokens fill slots ctx_len .. ctx_len + len - 2; its padding lands after."""
    dev = ctx_lens.device
    R, Tn = len(conts), max(len(x) for x in conts) - 1
    start = ctx_lens[sel]  # (R,)
    width = int(start.max()) + Tn
    ccache = cache.select(sel, width)
    inp = torch.zeros(R, Tn, dtype=torch.long)  # built on the host, moved once
    tgt = torch.zeros(R, Tn, dtype=torch.long)
    valid = torch.zeros(R, Tn, dtype=torch.bool)
    for j, c in enumerate(conts):
        x = torch.tensor(c)
        inp[j, :len(x) - 1], tgt[j, :len(x) - 1], valid[j, :len(x) - 1] = x[:-1], x[1:], True
    inp, tgt, valid = inp.to(dev), tgt.to(dev), valid.to(dev)
    pos = start[:, None] + torch.arange(Tn, device=dev)[None]  # (R, Tn)
    key_mask = torch.arange(width, device=dev)[None] < (start + valid.sum(1))[:, None]
    h = model.hidden(inp, ccache, pos, key_mask=key_mask, n_keys=width)  # (R, Tn, d)
    logp = F.log_softmax(model.lm_head(h[valid]).float(), dim=-1)  # (N valid, V)
    t = tgt[valid]
    tok_lp = logp.gather(1, t[:, None]).squeeze(1)
    row_of = torch.arange(R, device=dev)[:, None].expand(R, Tn)[valid]
    lp = torch.zeros(R, device=dev, dtype=tok_lp.dtype).index_add(0, row_of, tok_lp)
    misses = torch.zeros(R, dtype=torch.long, device=dev).index_add(0, row_of, (tok_lp < logp.amax(-1)).long())
    return lp, misses == 0


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's `mean_stderr`: sample standard deviation (n - 1) / sqrt(n); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def item_metrics(lls: Sequence[float], gold: int, norm_chars: Sequence[int]) -> tuple[int, int]:
    """(acc, acc_norm) of one multiple-choice item; ties go to the first choice, like numpy's argmax."""
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    normed = [ll / n if n else -math.inf for ll, n in zip(lls, norm_chars)]
    pred_norm = max(range(len(lls)), key=lambda i: (normed[i], -i))
    return int(pred == gold), int(pred_norm == gold)
