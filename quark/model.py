"""The one Quark transformer: used for training, inference, evaluation and the HF export.

Choices:
- Llama parameter names (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...), so a
  Llama-format export is a rename-free copy and HF `LlamaForCausalLM` is the test oracle.
- RoPE in Llama's "rotate half" layout; RMSNorm computed in fp32 like Llama.
- Attention is `F.scaled_dot_product_attention` with `enable_gqa=True`: K/V keep n_kv_heads, never repeated.
  A single-token step instead folds the query heads that share a KV head into queries of that head (plain
  SDPA, ~10-25% faster on CPU than the GQA path).
- One KV-cache layout `(n_layers, B, n_kv, max_len, hd)`. `input_pos` says which cache slots the new tokens
  fill: shape (T,) shared by the batch, or (B, T) per row (continuous batching). The RoPE position of a
  token is its slot; a left-padded row therefore sees the same relative positions as an unpadded one.
  `key_mask` (B, max_len) marks the real (non-pad) slots.
- `loss()` computes the cross-entropy in chunks of rows so the (tokens x 65,538) logits never exist at once.
- This file imports only torch (and is copied beside `modeling_quark.py` by the HF export), so it must not
  import anything from the quark package except as a sibling-relative `config` fallback.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None):
    """cos/sin tables (max_len, head_dim) in fp32, Llama's half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x (B, H, T, hd); cos/sin broadcastable to it
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class KVCache:
    """Preallocated keys/values for every layer: (n_layers, B, n_kv, max_len, hd)."""

    def __init__(self, config, batch_size: int, max_len: int | None = None, device=None, dtype=torch.float32):
        max_len = max_len or config.context_length
        if max_len > config.context_length:
            raise ValueError(f"KVCache max_len={max_len} exceeds the model's context_length={config.context_length}")
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_len = batch_size, max_len

    def update(self, layer: int, input_pos, k, v):
        # k, v: (B, n_kv, T, hd)
        if input_pos.dim() == 1:
            self.k[layer, :, :, input_pos] = k
            self.v[layer, :, :, input_pos] = v
        else:  # per-row slots (B, T)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer, rows, :, input_pos] = k.transpose(1, 2)
            self.v[layer, rows, :, input_pos] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, input_pos, mask, n_keys: int | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, input_pos, k, v)
            k, v = k[:, :, :n_keys], v[:, :, :n_keys]  # (B, n_kv, L, hd)
        if T == 1 and self.n_heads != self.n_kv_heads:
            # decode: the g query heads that share a KV head become g queries of that head (no GQA expansion;
            # the mask (B|1, 1, 1, L) is the same for all of them)
            g = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, g, self.head_dim), k, v, attn_mask=mask)
            return self.o_proj(y.reshape(B, 1, -1))
        is_causal = mask is None and cache is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, layer, cache, input_pos, mask, n_keys):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, input_pos, mask, n_keys)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.norm_eps)


class Quark(nn.Module):
    """Decoder-only transformer. `forward(idx)` -> logits (B, T, vocab_size)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ---- set-up -------------------------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None):
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

    def reset_rope(self):
        """Recompute the RoPE tables (after loading on the `meta` device or a dtype change)."""
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.context_length, c.rope_theta, device=self.lm_head.weight.device)
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
    def hidden(self, idx, cache: KVCache | None = None, input_pos=None, key_mask=None):
        """Final-norm hidden states (B, T, d_model)."""
        B, T = idx.shape
        mask, n_keys = None, None
        if input_pos is None:
            if cache is not None:
                raise ValueError("input_pos is required when a KV cache is given")
            if T > self.config.context_length:
                raise ValueError(f"sequence length {T} exceeds context_length={self.config.context_length}")
            pos = torch.arange(T, device=idx.device)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, hd)
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (T, hd) or (B, T, hd)
            if input_pos.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
            if cache is not None:
                n_keys = int(input_pos.max()) + 1
                mask = self._cache_mask(input_pos, n_keys, key_mask, T)
        x = self.model.embed_tokens(idx)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, cache, input_pos, mask, n_keys)
        return self.model.norm(x)

    @staticmethod
    def _cache_mask(input_pos, n_keys: int, key_mask, T: int):
        """Boolean (B|1, 1, T, n_keys) mask: a query sees earlier-or-same slots that hold real tokens.
        None when every query sees every key (single-token decode, no padding)."""
        if key_mask is None and T == 1 and input_pos.dim() == 1:
            return None
        keys = torch.arange(n_keys, device=input_pos.device)
        qpos = input_pos if input_pos.dim() == 2 else input_pos[None]  # (B|1, T)
        mask = keys[None, None, :] <= qpos[:, :, None]  # (B|1, T, L)
        if key_mask is not None:
            mask = mask & key_mask[:, None, :n_keys]
        return mask[:, None]

    def forward(self, idx, cache: KVCache | None = None, input_pos=None, key_mask=None):
        return self.lm_head(self.hidden(idx, cache, input_pos, key_mask)).float()

    def loss(self, idx, targets, loss_mask=None, chunk_rows: int = 4096, reduction: str = "mean"):
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
    def forward(ctx, h, w, t, chunk_rows: int):
        dev = h.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        wc = w.to(cd)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h)
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
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
            if cd == torch.float32:
                gw.addmm_(g.T, hc)
            else:
                gw += (g.T @ hc).float()
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        gh, gw = ctx.saved_tensors
        return gh * grad.to(gh.dtype), (gw * grad).to(ctx.w_dtype), None, None
