"""Turning logits into the next token: repetition penalty, temperature, top-p, and the NaN/Inf guard.

Choices (the card's `generate_text` semantics):
- `temperature == 0.0` is greedy. `top_p` in (0, 1]; `rep_penalty` > 0 (1.0 = off); all finite (NaN and inf
  are refused, naming the field).
- Any finite temperature > 0 works, however small: logits are divided by it after subtracting each row's
  maximum (`scale_logits`), so the top token scales to 0 and the rest to finite negatives or -inf, never inf or
  NaN. As T -> 0 that tends to greedy (ties split evenly), which is what T = 1e-40 gives.
- The repetition penalty applies to every distinct token already seen (prompt or output), CTRL-style:
  positive logits are divided by it, negative ones multiplied.
- A row whose logits are not all finite falls back to greedy over its finite entries for that step.
- Everything stays on the device (no host sync), so a CUDA-graph decode step can include it.
- The serving engine samples unseeded batches with `nucleus_sample` (the same distribution as `sample_next`
  without a full-vocabulary sort) and applies the penalty from token ids (`rep_penalty_ids`); both are here so
  every sampling function has one home.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The model card's "Recommended starting configuration": the one home of these numbers. `quark.load`, `quark chat`,
# `quark serve`, the exported generation_config.json and the speedrun's sample chats all read them from here.
RECOMMENDED = {"temperature": 0.2, "top_p": 0.9, "rep_penalty": 1.15, "max_new_tokens": 200}


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_sampling_args(temperature: float, top_p: float, rep_penalty: float, max_new_tokens: int | None = None) -> None:
    if not _real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not _real(top_p) or not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _real(rep_penalty) or rep_penalty <= 0:
        raise ValueError(f"rep_penalty must be a finite number > 0 (1.0 = off), got {rep_penalty!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def apply_rep_penalty(logits: torch.Tensor, seen: torch.Tensor, rep_penalty: float) -> torch.Tensor:
    """logits (B, V) float; seen (B, V) bool of tokens already in the prompt or output."""
    if rep_penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / rep_penalty, logits * rep_penalty)
    return torch.where(seen, penalised, logits)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, V) -> (B,) int64, each row's first maximum. On the CPU through numpy's vectorized argmax: torch's is a
    scalar loop there, ~10x slower over a 49k vocabulary (and slower again with two threads)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(x.detach().numpy().argmax(-1))
    return x.argmax(-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) float -> (B,) int64: each row's first maximum over its finite entries (NaN as -inf, +inf as
    the largest float), `sample_next` at temperature 0. On the CPU one argmax answers it wherever the maximum it
    finds is finite (a row with a NaN has one at its argmax: numpy's and torch's argmax return the first NaN); only
    other rows are cleaned first, which off the CPU every row is (no host sync)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        x = logits.detach().numpy()
        tok = x.argmax(-1)
        if all(math.isfinite(v) for v in x[range(x.shape[0]), tok].tolist()):
            return torch.from_numpy(tok)
    return argmax_rows(_finite_rows(logits, sync=False)[2])


def _finite_rows(logits: torch.Tensor, sync: bool = True) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """(B,) whether each row's logits are all finite, whether all rows are (found only with `sync`, a host round
    trip; False without it), and the logits with NaN -> -inf and +inf -> float max, copied only when needed. NaN
    propagates through amax and amin: two vectorized passes (isfinite().all() cost ~1 ms a batch-8 CPU step)."""
    finite = torch.isfinite(logits.amax(-1)) & torch.isfinite(logits.amin(-1))
    all_finite = sync and bool(finite.all())
    safe = logits if all_finite else torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    return finite, all_finite, safe


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature with each row's maximum subtracted first: the same softmax, and no overflow for any
    finite temperature > 0 (5.0 / 1e-40 is inf in float32; (5.0 - 5.0) / 1e-40 is 0). A temperature below the
    dtype's smallest normal number (float32: 1.2e-38; 5e-324 would round to 0 and give 0 / 0) is taken as that
    number, where sampling is already greedy up to exact ties. logits (B, V), no NaN."""
    return (logits - logits.amax(-1, keepdim=True)).div_(max(temperature, torch.finfo(logits.dtype).tiny))


def sample_next(logits: torch.Tensor, seen: torch.Tensor | None = None, temperature: float = 0.7, top_p: float = 0.9,
                rep_penalty: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). `seen` (B, V) bool enables the repetition penalty."""
    logits = logits.float()
    if seen is not None:
        logits = apply_rep_penalty(logits, seen, rep_penalty)
    if temperature == 0.0:
        return greedy(logits)
    finite, _, safe = _finite_rows(logits, sync=logits.device.type == "cpu")  # no host sync off the CPU
    probs = top_p_filter(scale_logits(safe, temperature), top_p).softmax(-1)
    probs = torch.where(finite[:, None], probs, torch.zeros_like(probs))
    probs[:, 0] += (~finite).float()  # keep rows valid for multinomial; replaced by greedy below
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(finite, sampled, argmax_rows(safe))


def rep_penalty_ids(logits: torch.Tensor, ids: torch.Tensor, rep_penalty: float) -> torch.Tensor:
    """`quark.sampling.apply_rep_penalty` where the seen set is given as ids (B, S) (repeats allowed): only
    those entries are read and written. logits (B, V) float."""
    if rep_penalty == 1.0:
        return logits
    vals = logits.gather(1, ids)
    return logits.scatter(1, ids, torch.where(vals > 0, vals / rep_penalty, vals * rep_penalty))


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float,
                   generator: torch.Generator | None = None, tries: int = 4) -> torch.Tensor:
    """logits (B, V) (repetition penalty already applied) -> tokens (B,), distributed as `sample_next` draws.

    `top_p_filter` keeps a token when the mass of the tokens ranked above it is < top_p. Here a token is drawn
    from the full distribution by inverse CDF and kept under that same rule (the mass of strictly more likely
    tokens, one pass over the row), else drawn again: rejection sampling, which draws exactly p / mass(kept) over
    the kept set and accepts with probability >= top_p, so no row is sorted. A row still rejected after `tries`
    draws is sampled from its explicitly masked distribution (one sort, of that row only)."""
    logits = logits.float()
    if temperature == 0.0:
        return greedy(logits)
    finite, all_finite, safe = _finite_rows(logits)
    probs = scale_logits(safe, temperature).softmax(-1)  # (B, V)
    B, V = probs.shape
    cdf = probs.cumsum(-1)

    def draw(rows: torch.Tensor | None) -> torch.Tensor:
        c = cdf if rows is None else cdf[rows]
        u = torch.rand(c.shape[0], 1, generator=generator, device=probs.device) * c[:, -1:]
        return torch.searchsorted(c, u, right=True).squeeze(-1).clamp(max=V - 1)

    tok = draw(None)
    rows = torch.arange(B, device=probs.device)
    if top_p < 1.0:
        for attempt in range(tries + 1):
            p = probs if attempt == 0 else probs[rows]  # (b, V)
            pt = p.gather(-1, tok[rows][:, None]).clamp_min(1e-30)  # (b, 1)
            # the mass ranked above the draw, in one float pass (~3x faster on CPU than a bool mask times p):
            # threshold keeps p / pt where it is > 1, i.e. p > pt (up to a rounding tie, counted as not above)
            above = F.threshold(p / pt, 1.0, 0.0).sum(-1) * pt[:, 0]
            rejected = above >= top_p  # it already reaches top_p: the draw is outside the top-p set
            rows = rows[rejected]
            if len(rows) == 0:
                break
            if attempt < tries:
                tok[rows] = draw(rows)
            else:  # unlucky rows: mask explicitly (the top-p set is the first n_keep of the sorted row)
                p = probs[rows]
                desc = p.sort(dim=-1, descending=True).values
                n_keep = ((desc.cumsum(-1) - desc) < top_p).sum(-1, keepdim=True).clamp(min=1)
                kept = p * (p >= desc.gather(-1, n_keep - 1))
                c = kept.cumsum(-1)
                u = torch.rand(len(rows), 1, generator=generator, device=probs.device) * c[:, -1:]
                tok[rows] = torch.searchsorted(c, u, right=True).squeeze(-1).clamp(max=V - 1)
    return tok if all_finite else torch.where(finite, tok, argmax_rows(safe))
