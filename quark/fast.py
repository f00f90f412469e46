"""Fast decoding: fused weights, a lean per-token step, and on CUDA a static cache with a CUDA-graph decode step.

`generate.stream_tokens` uses a `FastDecoder` (`decoder_for(model, B, max_len)`) for prefill + decode; the plain
`Quark.forward` path stays the readable reference and the two are tested to agree.

Choices:
- Weights are fused once per model: q/k/v into one (q+2kv, d) matrix and gate/up into one (2 d_ff, d) matrix, so
  a layer runs 4 matmuls instead of 7. int8 models (quark.quantize) fuse their int8 rows and scales the same way.
  The fused copies are refreshed in place when a source tensor's version counter moves (an optimizer step, a
  `load_state_dict`), so a model that keeps training between generations is never served stale weights.
- CPU: the step takes the position as a Python int, writes the cache with a slice copy and attends over only the
  filled slots with SDPA. Prefill computes logits for the last position only (like HF `generate`).
- CUDA: everything the step touches is preallocated (token, position, cache, mask); the step derives the RoPE
  row, the cache slot (`index_put_`) and the attention mask from a device position tensor, attends over the
  whole static cache with a mask (grouped-query attention by reshaping q, K/V never repeated), is compiled
  with `torch.compile` (fusing the elementwise work) and captured once as a `torch.cuda.CUDAGraph`. A decode
  step is then: copy token in, replay, sample on the device; no host sync. Prefill is compiled separately
  (dynamic length). Batch size and cache length are bucketed to powers of two so a server compiles a few
  graphs, not one per request. If compiling or capturing fails, it falls back (warning once) to plain eager.
- Continuous batching (quark.serve.engine): `prefill_rows(ids, lengths, start)` fills rows start.. (right-padded
  prompts), `step(tok, pos)` decodes rows 0..b-1 each at its own slot (`pos` (b,) on the device), `move_row`
  keeps the rows compact. The static step always takes per-row slots, so the same captured graph serves both
  uses; eagerly (CPU) the per-row step runs only the b live rows and attends over the filled slots only.
  `decoder_for` hands out one cached decoder per (batch, length) bucket and marks it `busy` while a generation
  owns it; a concurrent caller gets a fresh eager one. On CPU decoders get (in, out) weights.
- CPU decode steps run under quark.cpu_settings' thread tuner (QUARK_THREADS=N pins the count instead).
- `QUARK_FAST=0` disables the fast path everywhere; `QUARK_COMPILE=0` keeps CUDA graphs but skips torch.compile.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_settings import step_runner, threads_setting
from .model import Quark
from .quantize import Int4Linear, Int8Embedding, Int8Linear, int4_linear, int4_pack_for_kernel, int8_linear


def fast_enabled() -> bool:
    return os.environ.get("QUARK_FAST", "1") != "0"


def _sources(mods: list[nn.Module]) -> list[torch.Tensor]:
    out = []
    for m in mods:
        out.append(m.weight)
        if isinstance(m, Int8Linear):
            out.append(m.scale)
        elif isinstance(m, Int4Linear):
            out.append(m.scales_and_zeros)
    return out


class FusedLinear:
    """One matmul over the rows of several Linear / Int8Linear modules stacked (no copy for a single module).
    `transposed` (float weights) keeps the stack as one contiguous (in, out) matrix instead: `x @ W` over many
    rows runs ~25% faster than `F.linear` on CPU (MKL), at the cost of a copy for single modules too."""

    def __init__(self, mods: list[nn.Module], transposed: bool = False):
        self.mods = mods
        kinds = {type(m) for m in mods}
        if len(kinds) != 1 or not all(isinstance(m, (nn.Linear, Int8Linear, Int4Linear)) for m in mods):
            raise TypeError("FusedLinear needs modules that are all nn.Linear, all Int8Linear or all Int4Linear")
        self.int8, self.int4 = isinstance(mods[0], Int8Linear), isinstance(mods[0], Int4Linear)
        self.transposed = transposed and not (self.int8 or self.int4)
        self.split = [m.weight.shape[0] for m in mods]
        self._build()

    def _build(self):
        mods = self.mods
        if self.int4:  # plain nibbles concatenated, then packed once for the kernel (its packing mixes rows)
            if len(mods) == 1:
                self.weight, self.sz, self.packed = mods[0].qweight, mods[0].scales_and_zeros, mods[0].packed
            else:
                self.weight = torch.cat([m.qweight for m in mods])
                self.sz = torch.cat([m.scales_and_zeros for m in mods], dim=1)
                self.packed = int4_pack_for_kernel(self.weight)
            self.signature = self._signature()
            return
        if len(mods) == 1:
            self.weight = mods[0].weight.detach()
            self.scale = mods[0].scale if self.int8 else None
        else:
            self.weight = torch.cat([m.weight.detach() for m in mods])
            self.scale = torch.cat([m.scale for m in mods]) if self.int8 else None
        if self.transposed:
            self.weight = self.weight.t().contiguous()
        self.scale_bf16 = self.scale.to(torch.bfloat16) if self.int8 else None
        self.signature = self._signature()

    def _signature(self):
        return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in _sources(self.mods))

    def refresh(self) -> bool:
        """Re-copy the source weights if they changed in place; False if they were replaced (rebuild needed)."""
        sig = self._signature()
        if sig == self.signature:
            return True
        if [s[0::2] for s in sig] != [s[0::2] for s in self.signature] or self.int4:
            return False
        with torch.no_grad():
            if self.transposed:
                self.weight.copy_(torch.cat([m.weight.detach() for m in self.mods]).t())
            elif len(self.mods) > 1:
                torch.cat([m.weight.detach() for m in self.mods], out=self.weight)
                if self.int8:
                    torch.cat([m.scale for m in self.mods], out=self.scale)
            if self.int8:
                self.scale_bf16.copy_(self.scale)
        self.signature = sig
        return True

    def __call__(self, x):
        if self.int4:
            return int4_linear(x, self.weight, self.sz, self.packed)
        if self.int8:
            return int8_linear(x, self.weight, self.scale, self.scale_bf16)
        return x @ self.weight if self.transposed else F.linear(x, self.weight)


class FusedWeights:
    """The per-model weights of the fast path, shared by all decoders of that model."""

    def __init__(self, model, transposed: bool = False):
        c = model.config
        self.config = c
        self.embed = model.model.embed_tokens
        self.layers = []
        for blk in model.model.layers:
            a, m = blk.self_attn, blk.mlp
            self.layers.append((blk.input_layernorm.weight, FusedLinear([a.q_proj, a.k_proj, a.v_proj], transposed),
                                FusedLinear([a.o_proj], transposed), blk.post_attention_layernorm.weight,
                                FusedLinear([m.gate_proj, m.up_proj], transposed),
                                FusedLinear([m.down_proj], transposed)))
        self.norm = model.model.norm.weight
        self.lm_head = FusedLinear([model.lm_head], transposed)
        self.cos, self.sin = model.rope_cos, model.rope_sin
        self.norm_sources = [model.model.norm.weight, model.rope_cos] + [blk.input_layernorm.weight
                                                                          for blk in model.model.layers]
        self.norm_ptrs = [t.data_ptr() for t in self.norm_sources]
        self.embed_ptr = self.embed.weight.data_ptr()

    def fresh(self) -> bool:
        """Bring fused copies up to date; False if the model's tensors were replaced (the caller rebuilds)."""
        if [t.data_ptr() for t in self.norm_sources] != self.norm_ptrs:
            return False
        if self.embed.weight.data_ptr() != self.embed_ptr:
            return False
        ok = all(lin.refresh() for layer in self.layers for lin in (layer[1], layer[2], layer[4], layer[5]))
        return ok and self.lm_head.refresh()


def _rms(x, w, eps: float):
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


def _rope(x, cos, sin):
    # x (B, T, H, hd); cos/sin (T, 1, hd) fp32 -- Llama's rotate-half
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class FastDecoder:
    """Prefill + one-token decode steps for a batch of `batch_size` rows and a cache of `max_len` slots."""

    def __init__(self, model, weights: FusedWeights, batch_size: int, max_len: int, use_graph: bool = False,
                 use_compile: bool = False, runner=None):
        c = model.config
        if max_len > c.context_length:
            raise ValueError(f"decoder max_len={max_len} exceeds the model's context_length={c.context_length}")
        self.config, self.w = c, weights
        self.B, self.max_len = batch_size, max_len
        self.device, self.dtype = model.device, model.dtype
        self.nh, self.nkv, self.hd, self.eps = c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps
        self.q_dim, self.kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        # one tensor per layer (not views of one big one), so a compiled step mutates whole graph inputs in place
        shape = (batch_size, c.n_kv_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.n_layers)]
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=self.device)
        self.padded = False
        self.pos = 0
        self.use_graph, self.use_compile = use_graph, use_compile
        self.graph = None
        # CPU decode steps run at a thread count tuned from their own timings (quark/cpu_settings.py)
        self.runner = (runner or step_runner()) if self.device.type == "cpu" else None
        self.busy = False  # set by generate while a generation owns this decoder
        self._prefill_fn = self._prefill
        if use_graph:
            self.slots = torch.arange(max_len, device=self.device)
            self.static_tok = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.static_pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # per-row slots
            self.rows = torch.arange(batch_size, device=self.device)
            if use_compile:
                self._prefill_fn = torch.compile(self._prefill, dynamic=True)

    @property
    def busy(self) -> bool:
        return self._busy

    @busy.setter
    def busy(self, value: bool) -> None:
        self._busy = value
        if not value and self.runner is not None:  # a generation let go: torch's thread count as it found it
            self.runner.release()

    # ---- prefill ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (b, T) with b <= batch_size (rows beyond b are idle); key_mask (b, >=T) marks real tokens.
        Fills slots 0..T-1 and returns the last position's logits (b, V) in fp32 (continuous batching, rows
        at their own positions: `prefill_rows`)."""
        b, T = idx.shape
        if b > self.B or T >= self.max_len:
            raise ValueError(f"prefill of {b}x{T} does not fit a decoder of {self.B}x{self.max_len}")
        if b < self.B:
            idx = torch.cat([idx, idx.new_zeros(self.B - b, T)])
        self.key_mask.fill_(True)
        self.padded = key_mask is not None
        if key_mask is not None:
            self.key_mask[:b, :T] = key_mask[:, :T]
        mask = None
        if self.padded:
            causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
            mask = (causal & self.key_mask[:, None, :T]) | torch.eye(T, dtype=torch.bool, device=self.device)
            mask = mask[:, None]  # (B, 1, T, T); a pad query sees itself so no row is empty
        if self.runner is not None:
            self.runner.release()  # prefill at torch's own count
        logits = self._run_prefill(idx, mask, None)
        self.pos = T
        return logits[:b]

    @torch.no_grad()
    def prefill_rows(self, idx: torch.Tensor, lengths: torch.Tensor | None, start: int) -> torch.Tensor:
        """Continuous batching: m prompts right-padded into idx (m, T), true lengths `lengths` (m,) on the device
        (None: all T), written into rows start..start+m-1 while the other rows keep their state. Returns each
        prompt's last-token logits (m, V) fp32. Padding slots are written too; a row's decode step overwrites each
        before any query of that row can see it (a query sees slots <= its own)."""
        m, T = idx.shape
        if not 0 <= start <= self.B - m or T >= self.max_len:
            raise ValueError(f"prefill of {m}x{T} into rows {start}.. does not fit a decoder of "
                             f"{self.B}x{self.max_len}")
        self.key_mask[start:start + m].fill_(True)
        if self.runner is not None:
            self.runner.release()
        return self._run_prefill(idx, None, start, None if lengths is None else lengths - 1)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` cache slots into row dst (a serving engine keeping its rows compact)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]

    def _run_prefill(self, idx, mask, start, last=None):
        try:
            return self._prefill_fn(idx, mask, start, last)
        except Exception as e:  # compile problems must not break generation
            if self._prefill_fn is self._prefill:
                raise
            warnings.warn(f"compiled prefill failed ({type(e).__name__}: {e}); using eager prefill", stacklevel=3)
            self._prefill_fn = self._prefill
            return self._prefill(idx, mask, start, last)

    def _prefill(self, idx, mask, start: int | None, last=None):
        """idx (B, T) into rows start..start+B-1 (all rows when start is None); logits of position T-1, or of
        `last` (B,) per row."""
        B, T = idx.shape
        rows = slice(None) if start is None else slice(start, start + B)
        x = self.w.embed(idx)
        cos, sin = self.w.cos[:T, None], self.w.sin[:T, None]  # (T, 1, hd)
        for i, (w1, qkv_p, o_p, w2, gu_p, down_p) in enumerate(self.w.layers):
            qkv = qkv_p(_rms(x, w1, self.eps)).view(B, T, self.nh + 2 * self.nkv, self.hd)
            qk = _rope(qkv[:, :, :self.nh + self.nkv], cos, sin)
            q = qk[:, :, :self.nh].transpose(1, 2)  # (B, nh, T, hd)
            k = qk[:, :, self.nh:].transpose(1, 2)  # (B, nkv, T, hd)
            v = qkv[:, :, self.nh + self.nkv:].transpose(1, 2)
            self.k[i][rows, :, :T] = k
            self.v[i][rows, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.nh != self.nkv)
            x = x + o_p(y.transpose(1, 2).reshape(B, T, self.q_dim))
            g, u = gu_p(_rms(x, w2, self.eps)).chunk(2, dim=-1)
            x = x + down_p(F.silu(g) * u)
        x = x[:, -1] if last is None else x[torch.arange(B, device=x.device), last]
        return self.w.lm_head(_rms(x, self.w.norm, self.eps)).float()

    # ---- decode -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """tok (b,) -> logits (b, V) fp32 for the next slot; advances the shared position.
        With `pos` (b,) (device tensor, slots < max_len, the caller's bookkeeping), each row writes and attends
        at its own slot: the continuous-batching form; the shared position is left alone."""
        b = tok.shape[0]
        if pos is not None:
            if self.use_graph:
                self.static_pos[:b].copy_(pos)
                return self._graph_step(tok)[:b]
            n_keys = int(pos.max()) + 1
            return self._run(lambda: self._step_static(tok, pos, n_keys=n_keys))  # rows 0..b-1, filled slots only
        if self.pos >= self.max_len:
            raise ValueError(f"decoder cache is full ({self.max_len} slots)")
        if self.use_graph:
            self.static_pos.fill_(self.pos)  # a host scalar written into device memory: no sync
            out = self._graph_step(tok)
        else:
            if b < self.B:
                tok = torch.cat([tok, tok.new_zeros(self.B - b)])
            out = self._run(lambda: self._step_eager(tok, self.pos))
        self.pos += 1
        return out[:b]

    def _run(self, step):
        return step() if self.runner is None else self.runner.run(step)

    def _attend_block(self, i, x, cos, sin, write, attend):
        B = x.shape[0]
        w1, qkv_p, o_p, w2, gu_p, down_p = self.w.layers[i]
        qkv = qkv_p(_rms(x, w1, self.eps)).view(B, 1, self.nh + 2 * self.nkv, self.hd)
        qk = _rope(qkv[:, :, :self.nh + self.nkv], cos, sin)
        q = qk[:, :, :self.nh].transpose(1, 2)  # (B, nh, 1, hd)
        k = qk[:, :, self.nh:].transpose(1, 2)  # (B, nkv, 1, hd)
        v = qkv[:, :, self.nh + self.nkv:].transpose(1, 2)
        write(i, k, v)
        y = attend(i, q)  # (B, 1, nh*hd)
        x = x + o_p(y)
        g, u = gu_p(_rms(x, w2, self.eps)).chunk(2, dim=-1)
        return x + down_p(F.silu(g) * u)

    def _step_eager(self, tok, pos: int):
        B, n = tok.shape[0], pos + 1
        x = self.w.embed(tok[:, None])  # (B, 1, d)
        cos, sin = self.w.cos[pos:n, None], self.w.sin[pos:n, None]
        mask = self.key_mask[:, None, None, :n] if self.padded else None
        g = self.nh // self.nkv

        def write(i, k, v):
            self.k[i][:, :, pos:n] = k
            self.v[i][:, :, pos:n] = v

        def attend(i, q):  # the g query heads of a KV head attend as g queries of it (as in quark.model)
            y = F.scaled_dot_product_attention(q.reshape(B, self.nkv, g, self.hd), self.k[i][:, :, :n],
                                               self.v[i][:, :, :n], attn_mask=mask)
            return y.reshape(B, 1, self.q_dim)

        for i in range(len(self.w.layers)):
            x = self._attend_block(i, x, cos, sin, write, attend)
        return self.w.lm_head(_rms(x[:, 0], self.w.norm, self.eps)).float()

    def _step_static(self, tok, pos, n_keys: int | None = None):
        """Per-row step: tok (b,), pos (b,) per-row slots (device tensors) for rows 0..b-1. The CUDA-graph form
        (static shapes: all B rows, all slots, masked) and, with `n_keys`, the eager form that attends over the
        first n_keys slots only with SDPA (rows at different lengths: masked)."""
        B, g = tok.shape[0], self.nh // self.nkv
        L = self.max_len if n_keys is None else n_keys
        x = self.w.embed(tok[:, None])
        cos = self.w.cos.index_select(0, pos)[:, None, None]  # (B, 1, 1, hd)
        sin = self.w.sin.index_select(0, pos)[:, None, None]
        slots = torch.arange(L, device=pos.device) if not self.use_graph else self.slots
        mask = ((slots[None, :] <= pos[:, None]) & self.key_mask[:B, :L])[:, None, None, :]  # (B, 1, 1, L)
        scale = self.hd ** -0.5
        rows = self.rows if self.use_graph else torch.arange(B, device=pos.device)

        def write(i, k, v):  # index_put_ with device indices, as gpt-fast's KVCache.update
            self.k[i][rows, :, pos] = k[:, :, 0]  # (B, nkv, hd) into slot pos[b] of row b
            self.v[i][rows, :, pos] = v[:, :, 0]

        def attend(i, q):
            qg = q.reshape(B, self.nkv, g, self.hd)  # head h reads kv head h // g, as Llama's repeat_kv
            k, v = self.k[i][:B, :, :L], self.v[i][:B, :, :L]
            if n_keys is not None:
                return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).reshape(B, 1, self.q_dim)
            att = (qg @ k.transpose(-1, -2)).float() * scale  # (B, nkv, g, L)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
            return (att @ v).reshape(B, 1, self.q_dim)

        for i in range(len(self.w.layers)):
            x = self._attend_block(i, x, cos, sin, write, attend)
        return self.w.lm_head(_rms(x[:, 0], self.w.norm, self.eps)).float()

    def _graph_step(self, tok):
        b = tok.shape[0]
        self.static_tok[:b].copy_(tok)
        if self.graph is None:
            if self.device.type == "cuda":
                self._capture()
            else:  # the static step also runs eagerly elsewhere (tested on CPU)
                self.graph = False
        if self.graph is False:
            return self._step_static(self.static_tok, self.static_pos)
        self.graph.replay()
        return self.static_out

    def _capture(self):
        """Compile the static step (if asked) and capture it once as a CUDA graph; eager fallback on failure."""
        saved = [t.clone() for t in self.k + self.v]  # warm-up steps write a slot: restore it after
        try:
            fn = self._step_static
            if self.use_compile:
                fn = torch.compile(self._step_static, fullgraph=True, dynamic=False)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn(self.static_tok, self.static_pos)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_out = fn(self.static_tok, self.static_pos)
            self.graph = graph
        except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager
            warnings.warn(f"CUDA-graph decode unavailable ({type(e).__name__}: {e}); decoding eagerly", stacklevel=3)
            self.graph = False
        for t, s in zip(self.k + self.v, saved):
            t.copy_(s)


# ---- per-model registry -------------------------------------------------------------------------------------------
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pow2(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


_PLAIN_FORWARD, _PLAIN_HIDDEN = Quark.forward, Quark.hidden


def supports_fast(model) -> bool:
    """The fast path handles the Quark architecture (float or int8 weights). A model whose `forward` or `hidden`
    was overridden (a subclass or a patch) keeps the plain path, so the override is honoured."""
    return (fast_enabled() and isinstance(model, Quark) and type(model).forward is _PLAIN_FORWARD
            and type(model).hidden is _PLAIN_HIDDEN
            and isinstance(model.model.embed_tokens, (nn.Embedding, Int8Embedding)))


def decoder_for(model, batch_size: int, max_len: int) -> FastDecoder:
    """A FastDecoder for `model` with room for `batch_size` rows and `max_len` slots (reused on CUDA).
    On CPU decoders get (in, out) weights (see FusedLinear; built once per model, on first use): at one row too,
    `x @ W` ran 1.5x the tokens/s of `F.linear` on an AMD EPYC, one thread (dev/LOG.md, 2026-12-02)."""
    transposed = model.device.type != "cuda"
    entry = _REGISTRY.get(model)
    if entry is None:
        entry = _REGISTRY[model] = {"weights": {}, "decoders": {}}  # weights by layout (transposed or not)
    weights = entry["weights"].get(transposed)
    if weights is None or not weights.fresh():
        weights = entry["weights"][transposed] = FusedWeights(model, transposed)
        entry["decoders"] = {}  # captured decoders hold the replaced weights
    if model.device.type != "cuda":  # the thread tuner is kept per model, batch size and QUARK_THREADS setting
        key = ("runner", batch_size, threads_setting())
        if key not in entry:
            entry[key] = step_runner()
        return FastDecoder(model, weights, batch_size, max_len, runner=entry[key])
    B = _pow2(batch_size, 1)
    L = min(_pow2(max_len + 1, 256), model.config.context_length)
    key = (B, L, model.dtype)
    dec = entry["decoders"].get(key)
    if dec is not None and dec.busy:  # another generation is using the captured one: an eager one for this call
        return FastDecoder(model, weights, batch_size, max_len)
    if dec is None:
        use_compile = os.environ.get("QUARK_COMPILE", "1") != "0"
        dec = FastDecoder(model, weights, B, L, use_graph=True, use_compile=use_compile)
        entry["decoders"][key] = dec
    return dec
