"""Prefill + decode with the KV cache: batched generation, streaming, and the card's `generate_text`.

Choices:
- Prompts of different lengths are left-padded into one batch; `key_mask` hides the pad slots, so each
  row produces the same tokens it would alone.
- Prompt + max_new_tokens beyond the model's context is a ValueError before any work (chat and the server
  trim or cap first); nothing is silently truncated.
- A finished row (it produced `eos_token_id`) is padded with `eos_token_id` in the returned tensor, like
  HF `generate` pads with its pad token.
- `stream_tokens` is the primitive (a generator of (B,) token tensors); everything else collects it.
- Decoding runs through `quark.fast.FastDecoder` when the model allows it (fused weights, lean step; on CUDA a
  static cache and a CUDA-graph step); `fast=False` keeps the plain `model.forward` + `KVCache` reference path.
  Both give the same greedy tokens (tests/test_fast.py). `generate` keeps tokens on the device until the end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .fast import decoder_for, supports_fast
from .model import KVCache
from .sampling import check_sampling_args, sample_next


def _as_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return [row.tolist() for row in prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return [list(p) for p in prompts]


@torch.no_grad()
def stream_tokens(model, prompts, max_new_tokens: int = 200, temperature: float = 0.7, top_p: float = 0.9,
                  rep_penalty: float = 1.0, eos_token_id: int | None = None, seed: int | None = None,
                  generator: torch.Generator | None = None,
                  fast: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (tokens (B,), finished (B,) bool) once per decode step. Rows that finished earlier yield eos.
    `fast` (default: when the model supports it) decodes with quark.fast's FastDecoder (fused weights; on CUDA a
    static cache and a CUDA-graph step); False keeps the plain `model.forward` + KVCache path."""
    check_sampling_args(temperature, top_p, rep_penalty, max_new_tokens)
    rows = _as_lists(prompts)
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    vocab = cfg.vocab_size
    bad = [t for r in rows for t in r if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    T = max(len(r) for r in rows)
    if T + max_new_tokens > cfg.context_length:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context length "
                         f"{cfg.context_length}; shorten the prompt or lower max_new_tokens")
    if max_new_tokens == 0:
        return
    device, dtype = _device_dtype(model)
    B = len(rows)
    idx = torch.zeros(B, T, dtype=torch.long)
    key_mask = None
    if any(len(r) != T for r in rows):
        key_mask = torch.zeros(B, T + max_new_tokens, dtype=torch.bool)
        key_mask[:, T:] = True
    for b, r in enumerate(rows):
        idx[b, T - len(r):] = torch.tensor(r)
        if key_mask is not None:
            key_mask[b, T - len(r):T] = True
    idx = idx.to(device)
    key_mask = key_mask.to(device) if key_mask is not None else None
    seen = None
    if rep_penalty != 1.0:
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen[b, torch.tensor(r, device=device)] = True
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    use_fast = supports_fast(model) if fast is None else fast
    dec = cache = None
    if use_fast:
        dec = decoder_for(model, B, T + max_new_tokens)
        dec.busy = True
    try:
        if dec is not None:
            logits = dec.prefill(idx, key_mask)
        else:
            cache = KVCache(cfg, B, T + max_new_tokens, device=device, dtype=dtype)
            logits = model(idx, cache, torch.arange(T, device=device), key_mask)[:, -1]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        # On CUDA the "all rows finished?" check is a host sync: do it every few steps, not every token.
        check_every = 16 if device.type == "cuda" else 1
        for i in range(max_new_tokens):
            tok = sample_next(logits, seen, temperature, top_p, rep_penalty, generator)
            if eos_token_id is not None:
                tok = torch.where(finished, torch.full_like(tok, eos_token_id), tok)
                finished = finished | (tok == eos_token_id)
            yield tok, finished
            if i == max_new_tokens - 1:
                return
            if eos_token_id is not None and (i + 1) % check_every == 0 and bool(finished.all()):
                return
            if seen is not None:
                seen[torch.arange(B, device=device), tok] = True
            if dec is not None:
                logits = dec.step(tok)
            else:
                pos = torch.tensor([T + i], device=device)
                logits = model(tok[:, None], cache, pos, key_mask)[:, -1]
    finally:
        if dec is not None:
            dec.busy = False


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    if isinstance(getattr(type(model), "dtype", None), property):
        return model.device, model.dtype
    w = model.lm_head.weight
    return w.device, w.dtype


def generate(model, prompts, max_new_tokens: int = 200, temperature: float = 0.7, top_p: float = 0.9,
             rep_penalty: float = 1.0, eos_token_id: int | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, fast: bool | None = None) -> list[list[int]]:
    """New tokens for each prompt (a list of id lists), each cut after its eos (eos included).
    Tokens stay on the device until the end (one host transfer, no per-token sync)."""
    n_rows = len(_as_lists(prompts))
    steps = [tok for tok, _ in stream_tokens(model, prompts, max_new_tokens, temperature, top_p, rep_penalty,
                                             eos_token_id, seed, generator, fast)]
    if not steps:
        return [[] for _ in range(n_rows)]
    out = []
    for row in torch.stack(steps, 1).tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[:row.index(eos_token_id) + 1]
        out.append(row)
    return out


def generate_text(model, input_ids, max_new_tokens: int = 200, temperature: float = 0.7, top_p: float = 0.9,
                  rep_penalty: float = 1.0, eos_token_id: int | None = None, attention_mask=None,
                  seed: int | None = None, generator: torch.Generator | None = None,
                  fast: bool | None = None) -> torch.Tensor:
    """The card's method: (B, T) prompt ids -> (B, T + n) ids, prompt included.
    With `attention_mask` (B, T), zeros mark left padding."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, seq_len) LongTensor")
    if attention_mask is not None:
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
    else:
        prompts = input_ids
    new = generate(model, prompts, max_new_tokens, temperature, top_p, rep_penalty, eos_token_id, seed, generator,
                   fast)
    n = max((len(r) for r in new), default=0)
    fill = eos_token_id if eos_token_id is not None else 0
    tail = torch.full((input_ids.shape[0], n), fill, dtype=input_ids.dtype, device=input_ids.device)
    for b, r in enumerate(new):
        tail[b, :len(r)] = torch.tensor(r, dtype=input_ids.dtype)
    return torch.cat([input_ids, tail], dim=1)


def stream_text_ids(model, prompt: Sequence[int], **kw) -> Iterator[int]:
    """Streaming for one prompt: yields each new token id as soon as it is sampled (eos included)."""
    eos = kw.get("eos_token_id")
    for tok, _ in stream_tokens(model, [list(prompt)], **kw):
        t = int(tok[0])
        yield t
        if t == eos:
            return
