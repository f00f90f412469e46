"""Turning logits into the next token: repetition penalty, temperature, top-p, and the NaN/Inf guard.

Choices (the card's `generate_text` semantics):
- `temperature == 0.0` is greedy. `top_p` in (0, 1]; `rep_penalty` > 0 (1.0 = off).
- The repetition penalty applies to every distinct token already seen (prompt or output), CTRL-style:
  positive logits are divided by it, negative ones multiplied.
- A row whose logits are not all finite falls back to greedy over its finite entries for that step.
- Everything stays on the device (no host sync), so a CUDA-graph decode step can include it.
"""

from __future__ import annotations

import torch

# The model card's "Recommended starting configuration": the one home of these numbers. `quark.load`, `quark chat`,
# `quark serve`, the exported generation_config.json and the speedrun's sample chats all read them from here.
RECOMMENDED = {"temperature": 0.2, "top_p": 0.9, "rep_penalty": 1.15, "max_new_tokens": 200}


def check_sampling_args(temperature: float, top_p: float, rep_penalty: float, max_new_tokens: int | None = None):
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(rep_penalty, (int, float)) or rep_penalty <= 0:
        raise ValueError(f"rep_penalty must be > 0 (1.0 = off), got {rep_penalty!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def apply_rep_penalty(logits, seen, rep_penalty: float):
    """logits (B, V) float; seen (B, V) bool of tokens already in the prompt or output."""
    if rep_penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / rep_penalty, logits * rep_penalty)
    return torch.where(seen, penalised, logits)


def top_p_filter(logits, top_p: float):
    """Keep the smallest set of tokens whose probability mass reaches top_p (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(logits, seen=None, temperature: float = 0.7, top_p: float = 0.9, rep_penalty: float = 1.0,
                generator: torch.Generator | None = None):
    """logits (B, V) -> next token ids (B,). `seen` (B, V) bool enables the repetition penalty."""
    logits = logits.float()
    if seen is not None:
        logits = apply_rep_penalty(logits, seen, rep_penalty)
    finite = torch.isfinite(logits).all(-1)  # (B,)
    safe = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    greedy = safe.argmax(-1)
    if temperature == 0.0:
        return greedy
    probs = top_p_filter(safe / temperature, top_p).softmax(-1)
    probs = torch.where(finite[:, None], probs, torch.zeros_like(probs))
    probs[:, 0] += (~finite).float()  # keep rows valid for multinomial; replaced by greedy below
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(finite, sampled, greedy)
