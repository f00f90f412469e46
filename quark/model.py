"""The one Quark transformer: used for training, inference, evaluation and the HF export.

Choices:
- Llama parameter names (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...), so a
  Llama-format export is a rename-free copy and HF `LlamaForCausalLM` is the test oracle.
- RoPE in Llama's "rotate half" layout; RMSNorm computed in fp32 like Llama.
- Attention is `F.scaled_dot_product_attention` with `enable_gqa=True`: K/V keep n_kv_heads, never repeated.
  A single-token step instead folds the query heads that share a KV head into queries of that head (plain
  SDPA, ~10-25% faster on CPU than the GQA path).
- The layer math is written here once (`rms_norm`, `apply_rope`, `attend`, `layer_forward`); quark/fast.py runs the
  same functions over its fused weights. Its one copy is C++: quark/csrc/layer.h's `decode_layer` (the CPU decode
  step of quark's kernels), held to `layer_forward` by tests/test_decode_layer.py. To change the architecture, edit
  this file and layer.h (and the exports' parameter maps in quark/hf/ when a parameter is added or renamed).
- One cache type, `KVCache`: a (B, n_kv, max_len, hd) tensor per layer. `input_pos` says which cache slots the
  new tokens fill: an int start, a (T,) tensor shared by the batch, or (B, T) per row (continuous batching).
  The RoPE position of a token is its slot; a left-padded row therefore sees the same relative positions as an
  unpadded one. `key_mask` (B, max_len) marks the real (non-pad) slots. How many slots to attend over is the
  caller's to say (`n_keys`), so the model never waits on the device to find out.
- `loss()` computes the cross-entropy in chunks of rows so the (tokens x 65,538) logits never exist at once.
- This file imports only torch (and is copied beside `modeling_quark.py` by the HF export), so it must not
  import anything from the quark package except as a sibling-relative `config` fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: this file imports nothing from the package at run time
    from .config import QuarkConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (as Llama), scaled by `weight`, back in x's dtype."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE's (head_dim / 2,) inverse frequencies, with a checkpoint's `rope_scaling` rule applied as HF Llama
    does: "linear" divides every frequency by `factor`; "llama3" divides the low frequencies by `factor`, keeps
    the high ones and blends between them."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type")
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old_len / lo, inv / factor, inv)
        return torch.where((wavelen >= old_len / hi) & (wavelen <= old_len / lo), blended, out)
    return inv


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device | str | None = None,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) in fp32, Llama's half-split layout."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device)
    t = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hd) by cos/sin broadcastable to it (Llama's rotate-half), computed in fp32."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def attention_mask(slots: torch.Tensor, n_keys: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B|1, 1, T, n_keys) mask for queries at cache slots `slots` ((T,) or (B, T)): a query sees the
    slots up to its own that hold real tokens (`key_mask` (B, >= n_keys)), and always its own slot, so a
    padding query attends to something."""
    keys = torch.arange(n_keys, device=slots.device)
    q = (slots if slots.dim() == 2 else slots[None])[..., None]  # (B|1, T, 1)
    see = keys <= q
    if key_mask is not None:
        see = see & (key_mask[:, None, :n_keys] | (keys == q))
    return see[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False) -> torch.Tensor:
    """Attention of q (B, nh, T, hd) over k, v (B, n_kv, L, hd) -> (B, T, nh * hd). K/V are never repeated:
    prefill uses SDPA's GQA path; a single-token step folds the nh / n_kv query heads that share a KV head into
    that many queries of it (plain SDPA, ~10-25% faster on CPU than the GQA path)."""
    B, nh, T, hd = q.shape
    n_kv = k.shape[1]
    if T == 1 and nh != n_kv:
        y = F.scaled_dot_product_attention(q.reshape(B, n_kv, nh // n_kv, hd), k, v, attn_mask=mask)
        return y.reshape(B, 1, nh * hd)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=nh != n_kv)
    return y.transpose(1, 2).reshape(B, T, nh * hd)


class KVCache:
    """Preallocated keys/values, one (B, n_kv, max_len, hd) tensor per layer (so a compiled step mutates whole
    graph inputs in place). The one cache of every decode path: generate, the fast decoder, the serving engine,
    evaluation."""

    def __init__(self, config: QuarkConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        max_len = max_len or config.context_length
        if max_len > config.context_length:
            raise ValueError(f"KVCache max_len={max_len} exceeds the model's context_length={config.context_length}")
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]

    @classmethod
    def of(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> KVCache:
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, slots: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at `slots`: an int (slots s..s+T-1 of every row), a (T,) tensor, or a
        (B, T) tensor of per-row slots (continuous batching). Returns the layer's whole keys and values."""
        K, V = self.k[layer], self.v[layer]
        if isinstance(slots, int):
            K[:, :, slots:slots + k.shape[2]] = k
            V[:, :, slots:slots + k.shape[2]] = v
        elif slots.dim() == 1:
            K[:, :, slots] = k
            V[:, :, slots] = v
        else:  # advanced indices around a slice: the indexed dims come first, (B, T, n_kv, hd)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            K[rows, :, slots] = k.transpose(1, 2)
            V[rows, :, slots] = v.transpose(1, 2)
        return K, V

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as views (writes go through)."""
        if start == 0 and stop == self.batch_size:
            return self
        return KVCache.of([t[start:stop] for t in self.k], [t[start:stop] for t in self.v])

    def select(self, rows: torch.Tensor, width: int) -> KVCache:
        """A copy of the first `width` slots of `rows` (B',): e.g. one cached context per choice."""
        return KVCache.of([t[:, :, :width].index_select(0, rows) for t in self.k],
                          [t[:, :, :width].index_select(0, rows) for t in self.v])

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` slots into row dst (a serving engine keeping its rows compact)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class Context:
    """What one forward call's layers share besides the activations: the RoPE rows, the cache and where the
    new tokens go in it, the keys to attend over and their mask."""

    cos: torch.Tensor  # (T, 1, hd) or (B, T, 1, hd), broadcast over heads of (B, T, H, hd)
    sin: torch.Tensor
    cache: KVCache | None = None
    slots: int | torch.Tensor | None = None
    n_keys: int | None = None
    mask: torch.Tensor | None = None
    causal: bool = False

    @classmethod
    def build(cls, tables: tuple[torch.Tensor, torch.Tensor], T: int, *, cache: KVCache | None = None,
              slots: int | torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
              n_keys: int | None = None) -> Context:
        """`slots`: None (tokens at 0..T-1), an int s (at s..s+T-1, known on the host), or a (T,) / (B, T)
        tensor. `n_keys`: how many cache slots to attend over; the caller knows it (no host sync here). With a
        tensor of slots and no n_keys the whole cache is attended over, masked. `key_mask` (B, >= n_keys) marks
        the slots that hold real tokens (padding: False)."""
        cos, sin = tables
        if slots is None or isinstance(slots, int):
            s = slots or 0
            cos, sin = cos[s:s + T, None], sin[s:s + T, None]  # (T, 1, hd)
        else:
            cos, sin = cos[slots].unsqueeze(-2), sin[slots].unsqueeze(-2)  # (T | B,T, 1, hd)
        if cache is None:  # the keys are the T tokens themselves; slots only move RoPE
            mask = None if key_mask is None else attention_mask(torch.arange(T, device=cos.device), T, key_mask)
            return cls(cos, sin, None, slots, T, mask, causal=mask is None and T > 1)
        if isinstance(slots, int):
            n = n_keys if n_keys is not None else slots + T
            if key_mask is None and n == slots + T and (slots == 0 or T == 1):
                return cls(cos, sin, cache, slots, n, None, causal=T > 1)  # top-left causal is exact here
            slots_t = torch.arange(slots, slots + T, device=cos.device)
            return cls(cos, sin, cache, slots, n, attention_mask(slots_t, n, key_mask))
        n = n_keys if n_keys is not None else cache.max_len
        return cls(cos, sin, cache, slots, n, attention_mask(slots, n, key_mask))


def layer_forward(layer: Block | Any, x: torch.Tensor, ctx: Context, i: int) -> torch.Tensor:
    """Decoder layer i: x + attention(norm(x)), then + SwiGLU(norm(x)). The one place this math lives: `Block`
    (the model's layers) and quark/fast.py's fused layers both provide `ln1`, `ln2`, `eps`, `qkv(x)` -> q, k, v
    (B, T, H, hd), `o(y)`, `gate_up(x)` -> (gate, up) and `down(h)`."""
    q, k, v = layer.qkv(rms_norm(x, layer.ln1, layer.eps))
    q = apply_rope(q, ctx.cos, ctx.sin).transpose(1, 2)  # (B, nh, T, hd)
    k = apply_rope(k, ctx.cos, ctx.sin).transpose(1, 2)  # (B, n_kv, T, hd)
    v = v.transpose(1, 2)
    if ctx.cache is not None:
        k, v = ctx.cache.update(i, ctx.slots, k, v)
        k, v = k[:, :, :ctx.n_keys], v[:, :, :ctx.n_keys]
    x = x + layer.o(attend(q, k, v, ctx.mask, ctx.causal))
    gate, up = layer.gate_up(rms_norm(x, layer.ln2, layer.eps))
    return x + layer.down(F.silu(gate) * up)


class Attention(nn.Module):
    def __init__(self, c: QuarkConfig):
        super().__init__()
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)


class MLP(nn.Module):
    def __init__(self, c: QuarkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=False)


class Block(nn.Module):
    """One decoder layer with Llama's parameter names; its math is `layer_forward`."""

    def __init__(self, c: QuarkConfig):
        super().__init__()
        self.hd, self.eps = c.head_dim, c.norm_eps
        self.input_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = MLP(c)

    @property
    def ln1(self) -> torch.Tensor:
        return self.input_layernorm.weight

    @property
    def ln2(self) -> torch.Tensor:
        return self.post_attention_layernorm.weight

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, shape = self.self_attn, (*x.shape[:2], -1, self.hd)
        return a.q_proj(x).view(shape), a.k_proj(x).view(shape), a.v_proj(x).view(shape)

    def o(self, y: torch.Tensor) -> torch.Tensor:
        return self.self_attn.o_proj(y)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp.gate_proj(x), self.mlp.up_proj(x)

    def down(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(h)

    def forward(self, x: torch.Tensor, ctx: Context, i: int) -> torch.Tensor:
        return layer_forward(self, x, ctx, i)


class Backbone(nn.Module):
    def __init__(self, c: QuarkConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.norm_eps)


class Quark(nn.Module):
    """Decoder-only transformer. `forward(idx)` -> logits (B, T, vocab_size)."""

    def __init__(self, config: QuarkConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta,
                               scaling=config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ---- set-up -------------------------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> Quark:
        """GPT-2/nanoGPT-style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                s = std / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * s)
        return self

    def reset_rope(self) -> None:
        """Recompute the RoPE tables (after loading on the `meta` device or a dtype change)."""
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.context_length, c.rope_theta, device=self.lm_head.weight.device,
                               scaling=c.rope_scaling)
        self.rope_cos, self.rope_sin = cos, sin

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are yielded once

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, KV cache): the norms' dtype, also after int8 weight quantization."""
        return self.model.norm.weight.dtype

    # ---- forward ------------------------------------------------------------------------------------------
    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, input_pos: int | torch.Tensor | None = None,
               key_mask: torch.Tensor | None = None,
               n_keys: int | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model). With a cache, `input_pos` says which slots the tokens fill
        (an int start, or a (T,) / (B, T) tensor) and `n_keys` how many slots to attend over (see
        `Context.build`: the caller knows it, so nothing here waits on the device)."""
        T = idx.shape[1]
        if cache is not None and input_pos is None:
            raise ValueError("input_pos is required when a KV cache is given")
        if cache is None and input_pos is None and T > self.config.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length={self.config.context_length}")
        ctx = Context.build((self.rope_cos, self.rope_sin), T, cache=cache, slots=input_pos, key_mask=key_mask,
                            n_keys=n_keys)
        x = self.model.embed_tokens(idx)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx, i)
        return self.model.norm(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, input_pos: int | torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None,
                n_keys: int | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(idx, cache, input_pos, key_mask, n_keys)).float()

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None,
             chunk_rows: int = 4096, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy, computed in chunks so full logits never materialise.
        `targets` (B, T) with -100 (or loss_mask == 0) ignored. reduction: "mean" or "sum"."""
        h = self.hidden(idx).flatten(0, 1)
        t = targets.flatten()
        if loss_mask is not None:
            t = torch.where(loss_mask.flatten().bool(), t, torch.full_like(t, -100))
        if torch.is_grad_enabled() and (h.requires_grad or self.lm_head.weight.requires_grad):
            # memory-flat under autograd: each chunk's logits are freed before the next (see _LinearCrossEntropy)
            total = _LinearCrossEntropy.apply(h, self.lm_head.weight, t, chunk_rows)
        else:
            total = h.new_zeros((), dtype=torch.float32)
            for i in range(0, h.shape[0], chunk_rows):
                logits = self.lm_head(h[i:i + chunk_rows]).float()
                total = total + F.cross_entropy(logits, t[i:i + chunk_rows], ignore_index=-100, reduction="sum")
        if reduction == "sum":
            return total
        return total / (t != -100).sum().clamp(min=1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `h @ w.T` against targets (-100 ignored), chunk by chunk, with the gradients
    formed during the forward pass (softmax - onehot, times h and w), as Liger's fused linear cross-entropy does.
    No chunk's (rows x vocab) logits outlive its iteration, so memory stays flat at any vocabulary size, and
    nothing is recomputed: 3 matmuls per chunk, like plain forward + backward. Matmuls run in the autocast dtype
    when autocast is on; the softmax and the weight-gradient sum are fp32."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        dev = h.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        wc = w.to(cd)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h)
        need_gw = ctx.needs_input_grad[1]  # a frozen head (LoRA) needs no (vocab x d) weight gradient
        gw = torch.zeros(w.shape if need_gw else (0,), dtype=torch.float32, device=w.device)
        for i in range(0, h.shape[0], chunk_rows):
            hc, tc = h[i:i + chunk_rows].to(cd), t[i:i + chunk_rows]
            valid = tc != -100
            tsafe = torch.where(valid, tc, torch.zeros_like(tc))[:, None]  # (c, 1)
            logp = torch.log_softmax((hc @ wc.T).float(), dim=-1)  # (c, V), row-wise: cache-friendly on CPU
            total = total - (logp.gather(1, tsafe).squeeze(1) * valid).sum()
            g = logp.exp_()  # softmax, in place
            g.scatter_add_(1, tsafe, torch.full(tsafe.shape, -1.0, dtype=g.dtype, device=g.device))
            if h.is_cuda or torch.compiler.is_compiling() or not bool(valid.all()):  # no host sync on GPU
                g.mul_(valid[:, None])
            g = g.to(cd)
            gh[i:i + chunk_rows] = (g @ wc).to(h.dtype)
            if not need_gw:
                pass
            elif cd == torch.float32:
                gw.addmm_(g.T, hc)
            else:
                gw += (g.T @ hc).float()
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        gh, gw = ctx.saved_tensors
        gw = (gw * grad).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gh * grad.to(gh.dtype), gw, None, None
