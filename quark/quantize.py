"""Weight-only int8 and int4 quantization for inference: every linear layer, the embedding and the (tied) lm_head.

Choices (int8):
- Symmetric, per output channel (per row of `weight`): `w ~= q * scale`, q in [-127, 127], scale = max|row| / 127.
  No calibration data is needed and the error per weight is at most scale / 2.
- `quantize_int8(model)` swaps modules in place (like `torch.ao.quantization.quantize(inplace=True)`) and returns
  the same model; `copy.deepcopy` it first to keep the float model. Norm weights and RoPE tables stay as they are,
  so `model.dtype` (the norms' dtype) remains the compute dtype; activations and the KV cache keep it.
- The int8 buffer is named `weight` (device and shape read as before) with a float `scale` beside it.
- The matmul, as every CPU decode step (quark/fast.py), runs quark's kernels up to KERNEL_ROWS rows where they run
  (quark/kernels.py: activations quantized in blocks of 32 as llama.cpp's q8_0, int8 dot products); else, on a
  CPU, torch's `_weight_int8pack_mm` (bf16 activations) up to TORCH_KERNEL_ROWS rows; else the weight dequantized
  and an ordinary matmul in the compute dtype (larger batches, other devices).
- With tied embeddings the embedding and lm_head share one int8 table.
- `quark quantize --model M [--data D] [--bits 4]` (quantize_cli.py) quantizes a model folder and reports size,
  decode speed and, with a data folder, validation loss/perplexity of fp32 vs the quantized model.

Choices (int4, `quantize_int4`), gpt-fast's int4 path:
- Group-wise asymmetric: each row is cut into groups of `group_size` (32 by default, llama.cpp q4_0's block) input
  columns; q in [0, 15] and `w ~= (q - 8) * scale + zero` with scale = (max - min) / 15, zero = min + 8 * scale;
  scales and zeros in bf16 ((K/g, N, 2), torch's int4 layout, as saved).
- The module keeps its nibbles in a plain layout (`qweight` (N, K/2) uint8: column 2j in the low nibble, 2j+1 in
  the high one), so fusing q/k/v is a concatenation of rows, and on the CPU quark's kernels' (scale, zero) table
  (`table`, (N, K/32, 2), derived: rebuilt at load_state_dict, not saved).
- Up to KERNEL_ROWS rows on a CPU where quark's kernels run go through them; without them, the fast decoder's
  fused matrices go through torch's int4 kernel (`int4_pack_for_torch`, a packed copy the decoder makes) up to
  TORCH_KERNEL_ROWS rows; otherwise dequantize and matmul.
- A layer whose input size is not a multiple of `group_size` (the tiny preset's d_ff=688) stays int8, and the
  embedding / tied lm_head are int8 (as llama.cpp keeps the output matrix at higher precision in its 4-bit types).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quark import kernels

# up to this many rows quark's kernels beat dequantize + matmul (two threads, AMD EPYC, dev/LOG.md 2026-12-03 sixth
# session: a 2688x512 matrix at 256 rows int8 3.1 vs 5.5 ms, int4 4.4 vs 14.5): decode batches and prompts this long
KERNEL_ROWS = 256
# without quark's kernels, up to this many rows torch's int8 / int4 kernels (bf16 activations) beat dequantize +
# matmul on CPU (one token of quark-72m, one thread: int8 25 vs 542 ms, int4 18 vs 1401; dev/LOG.md 2026-12-07)
TORCH_KERNEL_ROWS = 32


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scale (N,)), symmetric per row."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _kernel_rows(x2: torch.Tensor) -> bool:
    return x2.device.type == "cpu" and x2.shape[0] <= KERNEL_ROWS and kernels.available()


def _torch_rows(x2: torch.Tensor) -> bool:
    return x2.device.type == "cpu" and x2.shape[0] <= TORCH_KERNEL_ROWS


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ (weight * scale[:, None]).T in x's dtype. weight int8 (N, K), scale fp32 (N,)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if _kernel_rows(x2):
        y = kernels.int8_gemv(x2, weight, scale)
    elif _torch_rows(x2):
        y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), weight, scale.to(torch.bfloat16))
    else:
        y = F.linear(x2, weight.to(x.dtype)) * scale.to(x.dtype)
    return y.to(x.dtype).view(*shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Linear:
        q, s = quantize_tensor(w)
        return cls(q.to(w.device), s.to(w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.out_dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight[idx].to(self.out_dtype) * self.scale[idx].to(self.out_dtype)[..., None]


# ---- int4 ----------------------------------------------------------------------------------------------------------
INT4_GROUP_SIZES = (32, 64, 128, 256)  # multiples of the kernels' 32-column blocks (torch's int4 sizes)


def quantize_int4_tensor(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q uint8 (N, K) in [0, 15], scales_and_zeros (K/g, N, 2) bf16), the kernel's operand layout;
    w ~= (q - 8) * scale + zero per group."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4: input size {K} is not a multiple of group_size={group_size}")
    g = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16).float()  # rounded first: q is chosen for the
    zero = (lo + 8 * scale).to(torch.bfloat16).float()                   # bf16 scale and zero the kernel uses
    q = torch.round((g - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return q.reshape(N, K), sz


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in [0, 15] -> (N, K/2): column 2j in the low nibble, 2j+1 in the high one."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, table: torch.Tensor | None = None,
                torch_packed: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(qweight).T in x's dtype; qweight (N, K/2) plain nibbles, sz (K/g, N, 2) bf16, `table` the
    kernels' (N, K/32, 2) copy of sz (`kernels.int4_table`), `torch_packed` torch's (`int4_pack_for_torch`)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if table is not None and _kernel_rows(x2):
        y = kernels.int4_gemv(x2, qweight, table)
    elif torch_packed is not None and _torch_rows(x2):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), torch_packed,
                                                       shape[-1] // sz.shape[0], sz)
    else:
        y = F.linear(x2, int4_dequantize(qweight, sz, x.dtype))
    return y.to(x.dtype).view(*shape[:-1], qweight.shape[0])


def int4_pack_for_torch(qweight: torch.Tensor) -> torch.Tensor | None:
    """torch's CPU int4 kernel's copy of the nibbles (rows interleaved in blocks; N a multiple of 16), or None."""
    if qweight.device.type != "cpu" or qweight.shape[0] % 16:
        return None
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qweight).to(torch.int32), 1)


def int4_dequantize(qweight: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_nibbles(qweight).to(dtype)
    N, K = q.shape
    G = sz.shape[0]
    scale, zero = sz.to(dtype).transpose(0, 1).unbind(-1)  # (N, G) each
    return ((q.view(N, G, K // G) - 8) * scale[..., None] + zero[..., None]).view(N, K)


class Int4Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.in_features, self.out_features = qweight.shape[1] * 2, qweight.shape[0]
        self.group_size = self.in_features // scales_and_zeros.shape[0]
        self.register_buffer("table", self._table(), persistent=False)
        self.register_load_state_dict_post_hook(Int4Linear._retable)  # `table` is derived, not saved

    def _table(self) -> torch.Tensor | None:
        cpu = self.qweight.device.type == "cpu"
        return kernels.int4_table(self.scales_and_zeros, self.group_size) if cpu else None

    @staticmethod
    def _retable(module: Int4Linear, _incompatible: object) -> None:
        module.table = module._table()

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 32) -> Int4Linear:
        q, sz = quantize_int4_tensor(w, group_size)
        return cls(pack_nibbles(q).to(w.device), sz.to(w.device))

    @property
    def weight(self) -> torch.Tensor:  # device / shape queries, as nn.Linear
        return self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.table if self.table is not None and self.table.device == x.device else None
        return int4_linear(x, self.qweight, self.scales_and_zeros, table)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int4_dequantize(self.qweight, self.scales_and_zeros, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding, Int4Linear)) for m in model.modules())


@torch.no_grad()
def quantize_int8(model: nn.Module, embeddings: bool = True) -> nn.Module:
    """Weight-only int8 (per-channel) for every nn.Linear and, by default, the embedding/lm_head. In place."""
    return _quantize(model, embeddings, Int8Linear.from_float)


@torch.no_grad()
def quantize_int4(model: nn.Module, group_size: int = 32) -> nn.Module:
    """Weight-only int4 (group-wise) for every nn.Linear whose input size `group_size` divides (others int8);
    the embedding and a tied lm_head int8. In place."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size={group_size}: allowed values are {', '.join(map(str, INT4_GROUP_SIZES))}")

    def make(w: torch.Tensor) -> Int4Linear:
        return Int4Linear.from_float(w, group_size) if w.shape[1] % group_size == 0 else Int8Linear.from_float(w)

    return _quantize(model, True, make)


def _quantize(model: nn.Module, embeddings: bool, make: Callable[[torch.Tensor], nn.Module]) -> nn.Module:
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
                setattr(mod, child_name, make(child.weight))
    return model


def model_nbytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
