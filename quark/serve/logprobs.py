"""Log-probabilities for the server: of the tokens the engine samples, and of a prompt's own tokens (`echo`).

Choices:
- A log-probability is of the model's own distribution, log_softmax of the raw logits in fp32, before any
  repetition penalty, temperature, top-p or grammar mask: the same figure whatever the sampling settings (what
  a scorer needs; vLLM's default too). -inf is reported as -9999.0, as vLLM does, since JSON has no infinity.
- A prompt is scored as `quark eval` scores one (quark/eval/scoring.py): the model's own `hidden` over the
  tokens, then `lm_head` and log_softmax in fp32, so lm-evaluation-harness's `local-completions` through the
  server gets `quark eval`'s numbers. Its greedy flag (a token's log-prob equals the best one) holds exactly,
  since a token's entry and the top list are read from one tensor.
- Only requests that ask pay: the (positions x vocabulary) log-softmax runs in chunks of `CHUNK` positions for
  the rows that asked, never for the whole batch.
- An entry is a plain tuple (token id, log-prob, ((id, log-prob), ...) best first) so it crosses the worker's
  pipe cheaply; the server turns it into OpenAI's shapes (`completion_logprobs`, `chat_logprobs`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..model import Quark
from ..tokenizer import Tokenizer

MAX_TOP = 20  # OpenAI's bound on top_logprobs (and on the completions API's logprobs)
CHUNK = 256
FLOOR = -9999.0

Entry = tuple[int, float, tuple[tuple[int, float], ...]]


def entries(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[Entry]:
    """logits (n, V) predicting tokens (n,) -> one entry each, with the `top_n` likeliest tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1).clamp_min_(FLOOR)
    chosen = lp.gather(1, tokens.to(lp.device)[:, None])[:, 0].tolist()
    if top_n:
        vals, ids = lp.topk(top_n, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [()] * len(chosen)
    return [(int(t), c, top) for t, c, top in zip(tokens.tolist(), chosen, tops)]


@torch.no_grad()
def score_prompts(model: Quark, prompts: Sequence[Sequence[int]], top_n: Sequence[int]
                  ) -> tuple[list[list[Entry]], torch.Tensor]:
    """(entries of tokens 1.. of each prompt (nothing predicts the first), each prompt's last-position logits
    (m, V)). One forward of the prompts right-padded: attention is causal, so padding never reaches a real
    position."""
    m, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(m, T, dtype=torch.long)
    for j, p in enumerate(prompts):
        idx[j, :len(p)] = torch.tensor(p)
    h = model.hidden(idx.to(model.device))  # (m, T, d)
    out = []
    for j, p in enumerate(prompts):
        rows: list[Entry] = []
        targets = torch.tensor(p[1:])
        for s in range(0, len(p) - 1, CHUNK):
            rows += entries(model.lm_head(h[j, s:s + CHUNK][:len(targets) - s]), targets[s:s + CHUNK], top_n[j])
        out.append(rows)
    last = torch.tensor([len(p) - 1 for p in prompts], device=h.device)
    return out, model.lm_head(h[torch.arange(m, device=h.device), last]).float()


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's byte <-> printable character table (GPT-2's `bytes_to_unicode`), inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """A token's own bytes (a byte-level BPE piece may hold part of a UTF-8 character, which decodes to U+FFFD)."""
    piece = tokenizer.tk.id_to_token(token)
    table = _byte_of_char()
    if piece is not None and token not in tokenizer.special.values() and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token]).encode("utf-8")


def completion_logprobs(tokenizer: Tokenizer, items: Sequence[Entry], offset: int = 0) -> dict:
    """The completions API's `logprobs` object; an entry (id, None, None) is an echoed prompt's first token, which
    has no log-prob (null, as OpenAI gives it). `text_offset` counts characters from `offset`."""
    tokens, lps, tops, offsets = [], [], [], []
    for t, v, top in items:
        text = token_text(tokenizer, t)
        tokens.append(text)
        lps.append(v)
        best: dict[str, float] | None = None
        if top is not None:
            best = {}
            for i, x in top:
                best.setdefault(token_text(tokenizer, i), x)  # two ids may decode alike (partial UTF-8): the likelier
        tops.append(best)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, items: Sequence[Entry]) -> dict:
    """The chat API's `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    def one(t: int, v: float) -> dict:
        text = token_text(tokenizer, t)
        return {"token": text, "logprob": v, "bytes": list(token_bytes(tokenizer, t))}

    return {"content": [{**one(t, v), "top_logprobs": [one(i, x) for i, x in top]} for t, v, top in items]}
