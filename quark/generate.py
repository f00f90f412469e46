"""Prefill + decode with the KV cache: batched generation, streaming, and the card's `generate_text`.

Choices:
- Prompts of different lengths are left-padded into one batch; `key_mask` hides the pad slots, so each
  row produces the same tokens it would alone.
- Prompt + max_new_tokens beyond the model's context is a ValueError before any work (chat and the server
  trim or cap first); nothing is silently truncated.
- A finished row (it produced `eos_token_id`) is padded with `eos_token_id` in the returned tensor, like
  HF `generate` pads with its pad token.
- `stream_tokens` is the primitive (a generator of (B,) token tensors); everything else collects it.
- One decoder interface, `Decoder` (prefill, step, and the per-row forms the serving engine uses) over one
  `KVCache`. `Decoder` runs the model's own `hidden`; quark/fast.py's FastDecoder subclasses it with fused
  weights (and on CUDA a CUDA-graph step) and is used when the model allows it; `fast=False` keeps `Decoder`.
  Both give the same greedy tokens (tests/test_fast.py). `generate` keeps tokens on the device until the end.
- This file imports only torch and its siblings model.py and sampling.py: the HF export ships it as is.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from .model import KVCache, Quark
from .sampling import check_sampling_args, sample_next

# one prompt (a list of ids), several, or a (B, T) / (T,) tensor of ids
Prompts = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


class Decoder:
    """Prefill + one-token decode steps for `batch_size` rows over one `KVCache` of `max_len` slots, through the
    model's own `hidden` + `lm_head`: the reference path, and the base of quark/fast.py's FastDecoder (which
    replaces only `forward`). Two ways to use it: `prefill(idx, key_mask)` then `step(tok)` (all rows at one
    shared position; generate), or `prefill_rows(idx, lengths, start)` then `step(tok, pos)` with per-row slots
    and `move_row` (continuous batching, quark/serve/engine.py)."""

    def __init__(self, model: Quark, batch_size: int, max_len: int):
        c = model.config
        if max_len > c.context_length:
            raise ValueError(f"decoder max_len={max_len} exceeds the model's context_length={c.context_length}")
        self.config, self.B, self.max_len = c, batch_size, max_len
        self.device, self.dtype = _device_dtype(model)
        self.cache = KVCache(c, batch_size, max_len, device=self.device, dtype=self.dtype)
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=self.device)
        self.padded, self.pos, self.busy = False, 0, False
        self._model = weakref.ref(model)  # a decoder kept in a per-model registry must not keep its model alive

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (b, T), b <= batch_size; key_mask (b, >= T) marks real tokens (left padding: False). Fills slots
        0..T-1 of rows 0..b-1 and returns the last position's logits (b, V) fp32."""
        b, T = idx.shape
        if b > self.B or T >= self.max_len:
            raise ValueError(f"prefill of {b}x{T} does not fit a decoder of {self.B}x{self.max_len}")
        self.key_mask.fill_(True)
        self.padded = key_mask is not None
        if key_mask is not None:
            self.key_mask[:b, :T] = key_mask[:, :T]
        self.pos = T
        return self.prefill_forward(idx, self.cache.rows(0, b), 0, self._mask(b), T)

    @torch.no_grad()
    def prefill_rows(self, idx: torch.Tensor, lengths: torch.Tensor | None, start: int,
                     offsets: torch.Tensor | None = None, n_keys: int | None = None) -> torch.Tensor:
        """m prompts right-padded into idx (m, T), true lengths `lengths` (m,) (None: all T), into rows
        start..start+m-1 while the other rows keep their state. Returns each prompt's last-token logits (m, V).
        Padding slots may be written too; a row's decode step overwrites each before any query of the row sees it.
        With `offsets` (m,), row j's tokens go to slots offsets[j].. and attend over the slots before them too
        (a prefix the caller copied in: quark/serve/prefix_cache.py); `n_keys` (> every real slot, the caller
        knows it) bounds the slots attended over. Padding slots past the cache land on its last slot."""
        m, T = idx.shape
        if not 0 <= start <= self.B - m or T >= self.max_len:
            raise ValueError(f"prefill of {m}x{T} into rows {start}.. does not fit a decoder of "
                             f"{self.B}x{self.max_len}")
        self.key_mask[start:start + m].fill_(True)
        last = None if lengths is None else lengths - 1
        if offsets is None:
            return self.prefill_forward(idx, self.cache.rows(start, start + m), 0, None, T, last)
        slots = (offsets[:, None] + torch.arange(T, device=offsets.device)).clamp_(max=self.max_len - 1)
        return self.prefill_forward(idx, self.cache.rows(start, start + m), slots, None, n_keys, last)

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: torch.Tensor | None = None, n_keys: int | None = None) -> torch.Tensor:
        """tok (b,) -> logits (b, V) fp32 for the next slot, advancing the shared position. With `pos` (b,)
        (device tensor, the caller's bookkeeping) each row writes and attends at its own slot and `n_keys`
        (> every pos; the caller knows it) bounds the slots attended over; the shared position is left alone."""
        if pos is not None:
            return self.decode(tok[:, None], pos[:, None], n_keys)
        if self.pos >= self.max_len:
            raise ValueError(f"decoder cache is full ({self.max_len} slots)")
        out = self.decode(tok[:, None], self.pos, self.pos + 1)
        self.pos += 1
        return out

    def decode(self, tok: torch.Tensor, slots: int | torch.Tensor, n_keys: int | None) -> torch.Tensor:
        """One token per row at `slots` (the shared int position, or (b, 1) per row). FastDecoder overrides
        this with the step its decoder_for chose."""
        b = tok.shape[0]
        if n_keys is None and not isinstance(slots, int):
            n_keys = int(slots.max()) + 1 if slots.device.type == "cpu" else self.max_len  # no sync off the CPU
        return self.forward(tok, self.cache.rows(0, b), slots, self._mask(b), n_keys)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` cache slots into row dst (a serving engine keeping its rows compact)."""
        self.cache.move_row(src, dst, length)

    def _mask(self, b: int) -> torch.Tensor | None:
        return self.key_mask[:b] if self.padded else None

    def prefill_forward(self, *args) -> torch.Tensor:
        return self.forward(*args)

    def forward(self, idx: torch.Tensor, cache: KVCache, slots: int | torch.Tensor, key_mask: torch.Tensor | None,
                n_keys: int | None, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (b, V) fp32 of the last position of idx (b, T), or of position `last` (b,) per row."""
        model = self._model()
        h = model.hidden(idx, cache, slots, key_mask, n_keys)
        h = h[:, -1] if last is None else h[torch.arange(h.shape[0], device=h.device), last]
        return model.lm_head(h).float()


# quark/fast.py registers its decoder factory here when imported (quark/__init__.py imports it); the HF
# remote-code copy of this file ships without it and decodes with `Decoder`.
_FAST_DECODER: list[Callable] = []


def register_fast_decoder(factory: Callable) -> None:
    """`factory(model, batch_size, max_len)` -> a Decoder, or None for a model it does not take."""
    _FAST_DECODER[:] = [factory]


def make_decoder(model: Quark, batch_size: int, max_len: int, fast: bool | None = None) -> Decoder:
    """The fast decoder when one is registered and takes the model (fast None or True), else `Decoder`."""
    if fast is not False and _FAST_DECODER:
        dec = _FAST_DECODER[0](model, batch_size, max_len)
        if dec is not None:
            return dec
    if fast:
        raise ValueError("fast=True, but the fast decoder (quark/fast.py) is not available for this model")
    return Decoder(model, batch_size, max_len)


def check_prompts(rows: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int, context_length: int) -> None:
    """ValueError unless every prompt can run: non-empty, ids in the vocabulary, prompt + max_new_tokens within
    the context (nothing is silently truncated). The one check of generate, `quark.load` and the engine."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("the prompt is empty: every prompt needs at least one token")
    bad = [t for r in rows for t in r if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
    T = max(len(r) for r in rows)
    if T + max_new_tokens > context_length:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context length "
                         f"{context_length}; shorten the prompt or lower max_new_tokens")


def _as_lists(prompts: Prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return [row.tolist() for row in prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return [list(p) for p in prompts]


def _left_pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts left-padded into (B, T) ids, and a (B, T) key mask (None when all have the same length)."""
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    key_mask = torch.zeros(len(rows), T, dtype=torch.bool) if any(len(r) != T for r in rows) else None
    for b, r in enumerate(rows):
        idx[b, T - len(r):] = torch.tensor(r)
        if key_mask is not None:
            key_mask[b, T - len(r):] = True
    return idx.to(device), None if key_mask is None else key_mask.to(device)


@torch.no_grad()
def stream_tokens(model: Quark, prompts: Prompts, max_new_tokens: int = 200, *, temperature: float = 0.7, top_p: float = 0.9,
                  rep_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
                  generator: torch.Generator | None = None,
                  fast: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (tokens (B,), finished (B,) bool) once per decode step. Rows that finished earlier yield their
    first eos again; `eos_token_id` is one stop id or several (a model's `Tokenizer.stop_ids`).
    `fast` (default: when the model supports it) decodes with quark.fast's FastDecoder (fused weights; on CUDA a
    static cache and a CUDA-graph step); False keeps the reference `Decoder` (model.hidden over a KVCache)."""
    check_sampling_args(temperature, top_p, rep_penalty, max_new_tokens)
    rows = _as_lists(prompts)
    cfg = model.config
    check_prompts(rows, max_new_tokens, cfg.vocab_size, cfg.context_length)
    T, vocab = max(len(r) for r in rows), cfg.vocab_size
    if max_new_tokens == 0:
        return
    device, _ = _device_dtype(model)
    B = len(rows)
    idx, key_mask = _left_pad(rows, device)
    seen = None
    if rep_penalty != 1.0:
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen[b, torch.tensor(r, device=device)] = True
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    stops = stop_tensor(eos_token_id, device)
    dec = make_decoder(model, B, T + max_new_tokens, fast)
    dec.busy = True
    try:
        logits = dec.prefill(idx, key_mask)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        last = None
        # On CUDA the "all rows finished?" check is a host sync: do it every few steps, not every token.
        check_every = 16 if device.type == "cuda" else 1
        for i in range(max_new_tokens):
            tok = sample_next(logits, seen, temperature, top_p, rep_penalty, generator)
            if stops is not None:
                tok = tok if last is None else torch.where(finished, last, tok)
                finished = finished | torch.isin(tok, stops)
                last = tok
            yield tok, finished
            if i == max_new_tokens - 1:
                return
            if stops is not None and (i + 1) % check_every == 0 and bool(finished.all()):
                return
            if seen is not None:
                seen[torch.arange(B, device=device), tok] = True
            logits = dec.step(tok)
    finally:
        dec.busy = False


def stop_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    return [] if eos_token_id is None else [int(eos_token_id)] if isinstance(eos_token_id, int) \
        else [int(i) for i in eos_token_id]


def stop_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    ids = stop_ids(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _device_dtype(model: Quark) -> tuple[torch.device, torch.dtype]:
    if isinstance(getattr(type(model), "dtype", None), property):
        return model.device, model.dtype
    w = model.lm_head.weight
    return w.device, w.dtype


def generate(model: Quark, prompts: Prompts, max_new_tokens: int = 200, *, temperature: float = 0.7, top_p: float = 0.9,
             rep_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, fast: bool | None = None) -> list[list[int]]:
    """New tokens for each prompt (a list of id lists), each cut after its eos (eos included).
    Tokens stay on the device until the end (one host transfer, no per-token sync)."""
    n_rows = len(_as_lists(prompts))
    kw = dict(temperature=temperature, top_p=top_p, rep_penalty=rep_penalty, eos_token_id=eos_token_id, seed=seed,
              generator=generator, fast=fast)
    steps = [tok for tok, _ in stream_tokens(model, prompts, max_new_tokens, **kw)]
    if not steps:
        return [[] for _ in range(n_rows)]
    out, stops = [], set(stop_ids(eos_token_id))
    for row in torch.stack(steps, 1).tolist():
        end = next((j for j, t in enumerate(row) if t in stops), None)
        out.append(row if end is None else row[:end + 1])
    return out


def generate_text(model: Quark, input_ids: torch.Tensor, max_new_tokens: int = 200, *, temperature: float = 0.7,
                  top_p: float = 0.9, rep_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                  attention_mask: torch.Tensor | None = None,
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
    new = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, rep_penalty=rep_penalty,
                   eos_token_id=eos_token_id, seed=seed, generator=generator, fast=fast)
    n = max((len(r) for r in new), default=0)
    fill = (stop_ids(eos_token_id) or [0])[0]
    tail = torch.full((input_ids.shape[0], n), fill, dtype=input_ids.dtype, device=input_ids.device)
    for b, r in enumerate(new):
        tail[b, :len(r)] = torch.tensor(r, dtype=input_ids.dtype)
    return torch.cat([input_ids, tail], dim=1)


def stream_text_ids(model: Quark, prompt: Sequence[int], **kw) -> Iterator[int]:
    """Streaming for one prompt: yields each new token id as soon as it is sampled (eos included)."""
    stops = set(stop_ids(kw.get("eos_token_id")))
    for tok, _ in stream_tokens(model, [list(prompt)], **kw):
        t = int(tok[0])
        yield t
        if t in stops:
            return
