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
- `quark quantize --model M [--data D]` quantizes a model folder and reports size, decode speed and, with a data
  folder, validation loss/perplexity of fp32 vs int8 (the 2% budget of the issue).
"""

from __future__ import annotations

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


# ---- CLI --------------------------------------------------------------------------------------------------------
def _cmd_quantize(args):
    import copy
    import json
    import math
    import time

    from .generate import generate
    from .weights import load_model

    model = load_model(args.model, device="cpu", dtype=torch.float32).eval()
    q = quantize_int8(copy.deepcopy(model))
    report = {"model": str(args.model), "fp32_bytes": model_nbytes(model), "int8_bytes": model_nbytes(q)}
    prompt = [[1 + i % 200 for i in range(16)]]
    n = min(args.tokens, model.config.context_length - 16)
    for name, m in (("fp32", model), ("int8", q)):
        generate(m, prompt, max_new_tokens=4, temperature=0.0)
        t0 = time.perf_counter()
        generate(m, prompt, max_new_tokens=n, temperature=0.0)
        report[f"{name}_decode_tok_per_s"] = round(n / (time.perf_counter() - t0), 1)
    if args.data:
        for name, m in (("fp32", model), ("int8", q)):
            report[f"{name}_val_loss"] = round(val_loss(m, args.data, args.eval_tokens), 5)
        report["ppl_ratio"] = round(math.exp(report["int8_val_loss"] - report["fp32_val_loss"]), 5)
    print(json.dumps(report, indent=2))


@torch.no_grad()
def val_loss(model, data_folder, max_tokens: int = 65536, seq_len: int | None = None) -> float:
    """Mean next-token loss over the first `max_tokens` tokens of a pre-training data folder's val split."""
    import json
    from pathlib import Path

    import numpy as np

    folder = Path(data_folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not a data folder written by `quark prepare`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("kind") != "pretrain":
        raise ValueError(f"{manifest_path}: kind={manifest.get('kind')!r}, need a 'pretrain' data folder")
    shards = manifest["splits"]["val"]["shards"]
    toks = np.concatenate([np.load(folder / "val" / s, mmap_mode="r")[:max_tokens + 1] for s in shards])
    toks = torch.from_numpy(toks[:max_tokens + 1].astype(np.int64))
    T = seq_len or min(model.config.context_length, 512)
    n = (toks.numel() - 1) // T
    if n == 0:
        raise ValueError(f"{folder}: validation split has fewer than {T + 1} tokens")
    x, y = toks[:n * T].view(n, T), toks[1:n * T + 1].view(n, T)
    total = 0.0
    for i in range(0, n, 4):
        total += float(model.loss(x[i:i + 4], y[i:i + 4], reduction="sum"))
    return total / (n * T)


def add_commands(sub) -> None:
    p = sub.add_parser("quantize", help="int8 weight-only quantization: size, decode speed and val loss vs fp32")
    p.add_argument("--model", required=True, help="model folder, export or run folder")
    p.add_argument("--data", default=None, help="pre-training data folder: compare validation loss fp32 vs int8")
    p.add_argument("--tokens", type=int, default=128, help="new tokens for the decode-speed check")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens for the loss comparison")
    p.set_defaults(func=_cmd_quantize)
