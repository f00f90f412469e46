"""Weight-only int8 quantization for inference: every linear layer, the embedding and the (tied) lm_head.

Choices:
- Symmetric, per output channel (per row of `weight`): `w ~= q * scale`, q in [-127, 127], scale = max|row| / 127.
  No calibration data is needed and the error per weight is at most scale / 2.
- `quantize_int8(model)` swaps modules in place (like `torch.ao.quantization.quantize(inplace=True)`) and returns
  the same model; `copy.deepcopy` it first to keep the float model. Norm weights and RoPE tables stay as they are,
  so `model.dtype` (the norms' dtype) remains the compute dtype; activations and the KV cache keep it.
- The int8 buffer is named `weight` (device and shape read as before) with a float `scale` beside it.
- Small batches (decode) on CPU use `torch.ops.aten._weight_int8pack_mm` with bf16 activations: it reads 1 byte
  per weight, 4x less memory traffic than fp32, which is what bounds decoding at batch 1. Larger batches
  (prefill, scoring) and other devices dequantize the weight and run an ordinary matmul in the compute dtype.
- With tied embeddings the embedding and lm_head share one int8 table.
- `quark quantize --model M [--data D]` (quantize_cli.py) quantizes a model folder and reports size, decode speed
  and, with a data folder, validation loss/perplexity of fp32 vs int8 (the 2% budget of the issue).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")
SMALL_BATCH_ROWS = 32  # up to this many rows the int8 kernel beats dequantize + matmul on CPU (measured)


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scale (N,)), symmetric per row."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor | None = None):
    """y = x @ (weight * scale[:, None]).T in x's dtype. weight int8 (N, K), scale fp32 (N,)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if _INT8PACK and x.device.type == "cpu" and x2.shape[0] <= SMALL_BATCH_ROWS:
        s = scale_bf16 if scale_bf16 is not None else scale.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), weight, s)
    else:
        y = F.linear(x2, weight.to(x.dtype)) * scale.to(x.dtype)
    return y.to(x.dtype).view(*shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Linear:
        q, s = quantize_tensor(w)
        return cls(q.to(w.device), s.to(w.device))

    def forward(self, x):
        return int8_linear(x, self.weight, self.scale, self.scale_bf16)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.out_dtype = dtype

    def forward(self, idx):
        return self.weight[idx].to(self.out_dtype) * self.scale[idx].to(self.out_dtype)[..., None]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


@torch.no_grad()
def quantize_int8(model: nn.Module, embeddings: bool = True) -> nn.Module:
    """Weight-only int8 (per-channel) for every nn.Linear and, by default, the embedding/lm_head. In place."""
    if is_quantized(model):
        return model
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    lm_head = getattr(model, "lm_head", None)
    tied = emb is not None and lm_head is not None and lm_head.weight is emb.weight
    shared = None
    if embeddings and emb is not None:
        shared = Int8Linear.from_float(emb.weight)
        model.model.embed_tokens = Int8Embedding(shared.weight, shared.scale, dtype)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if full == "lm_head" and tied:
                if shared is None:  # embedding kept in float: keep the tied head in float too
                    continue
                setattr(mod, child_name, shared)
            else:
                setattr(mod, child_name, Int8Linear.from_float(child.weight))
    return model


def model_nbytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---- CLI ---------------------------------------------------------------------------------------------------------
def add_commands(sub) -> None:
    """`quark quantize`. Its code lives in quark/quantize_cli.py, loaded by name when the command runs: this file
    is copied into HF exports (fast.py imports it), which must not pull in the package's loaders."""
    p = sub.add_parser("quantize", help="int8 weight-only quantization: size, decode speed and val loss vs fp32")
    p.add_argument("--model", required=True, help="model folder, export or run folder")
    p.add_argument("--data", default=None, help="pre-training data folder: compare validation loss fp32 vs int8")
    p.add_argument("--tokens", type=int, default=128, help="new tokens for the decode-speed check")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens for the loss comparison")
    p.set_defaults(func=lambda args: importlib.import_module("quark.quantize_cli").cmd_quantize(args))
