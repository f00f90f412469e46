"""Weight-only int8 and int4 quantization for inference: every linear layer, the embedding and the (tied) lm_head.

Choices (int8):
- Symmetric, per output channel (per row of `weight`): `w ~= q * scale`, q in [-127, 127], scale = max|row| / 127.
  No calibration data is needed and the error per weight is at most scale / 2.
- `quantize_int8(model)` swaps modules in place (like `torch.ao.quantization.quantize(inplace=True)`) and returns
  the same model; `copy.deepcopy` it first to keep the float model. Norm weights and RoPE tables stay as they are,
  so `model.dtype` (the norms' dtype) remains the compute dtype; activations and the KV cache keep it.
- The int8 buffer is named `weight` (device and shape read as before) with a float `scale` beside it.
- Up to KERNEL_ROWS rows on a CPU with AVX512-VNNI (decode steps and prompts up to 256 tokens) go through quark's
  own kernel (quark/kernels.py): each row quantized in blocks of 32 as llama.cpp's q8_0 does, int8 dot products,
  1.3-1.9x `_weight_int8pack_mm` below and 1.1-1.2x fbgemm's one-row linear, and callable from compiled graphs.
  Other CPUs (or no compiler) take the torch kernels of the next two points.
- One row on CPU (batch-1 decode) goes through fbgemm's dynamic int8 linear
  (`torch.ops.quantized.linear_dynamic`, the kernel of `torch.ao.quantization.quantize_dynamic`): the row is
  quantized on the fly to 8 bits (7-bit range, fbgemm's `reduce_range`, so no int16 saturation) and multiplied
  with int8 dot products, as llama.cpp's q8_0 quantizes activations; 1.8x the decode speed of the bf16-activation
  kernel below on an AMD EPYC (dev/LOG.md 2026-12-03). fbgemm wants its own prepacked copy of the weight
  (`int8_pack_dynamic`, built lazily, ~1 byte per weight more in memory). Where torch has no fbgemm (or drops
  its deprecated quantized tensors), this path is skipped.
- Other small batches (2..SMALL_BATCH_ROWS rows) on CPU use `torch.ops.aten._weight_int8pack_mm` with bf16
  activations, whose rows are independent (fbgemm's activation scale is per tensor, which would couple the rows
  of a batch): it reads 1 byte per weight, 4x less memory traffic than fp32. Larger batches (prefill, scoring)
  and other devices dequantize the weight and run an ordinary matmul in the compute dtype.
- With tied embeddings the embedding and lm_head share one int8 table.
- `quark quantize --model M [--data D] [--bits 4]` (quantize_cli.py) quantizes a model folder and reports size,
  decode speed and, with a data folder, validation loss/perplexity of fp32 vs the quantized model.

Choices (int4, `quantize_int4`), gpt-fast's int4 path:
- Group-wise asymmetric: each row is cut into groups of `group_size` (32 by default, llama.cpp q4_0's block) input
  columns; q in [0, 15] and `w ~= (q - 8) * scale + zero` with scale = (max - min) / 15, zero = min + 8 * scale,
  the convention of `torch.ops.aten._weight_int4pack_mm_for_cpu`, which runs the matmul with bf16 activations and
  bf16 scales/zeros ((K/g, N, 2), stored as such: the dequantizing path uses the same values).
- Up to KERNEL_ROWS rows on a CPU with AVX512-VNNI run quark's int4 kernel (quark/kernels.py: the plain
  nibbles, a (scale, zero) table per 32 columns, int8 activations per 32, 1.27x torch's int4 kernel at two
  threads in bench/cpu_kernels.py, even at one); elsewhere torch's int4 kernel. `packed` holds whichever second
  operand the kernel in use takes (`int4_pack_for_kernel`): quark's (N, K/32, 2) table or torch's packed weight.
- The module keeps its nibbles in a plain layout (`qweight` (N, K/2) uint8: column 2j in the low nibble, 2j+1 in
  the high one), because torch's kernel packing is not row-separable (rows are interleaved in blocks of 64): the
  fast path (quark/fast.py) fuses q/k/v by concatenating plain nibbles and packing once.
- A layer whose input size is not a multiple of `group_size` (the tiny preset's d_ff=688) stays int8, and the
  embedding / tied lm_head are int8 (as llama.cpp keeps the output matrix at higher precision in its 4-bit types).
- Batches above KERNEL_ROWS (quark's kernel) or SMALL_BATCH_ROWS (torch's) and other devices dequantize and run an
  ordinary matmul.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quark import kernels

_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")
SMALL_BATCH_ROWS = 32  # up to this many rows torch's int8/int4 kernels beat dequantize + matmul on CPU (measured)
# up to this many rows quark's kernels do (two threads, AMD EPYC, dev/LOG.md 2026-12-03 sixth session: a 2688x512
# matrix at 256 rows int8 3.1 vs 5.5 ms, int4 4.4 vs 14.5; at 512 rows a 768x512 int4 one lost, 3.1 vs 2.9):
# decode batches and the prefill of prompts up to this long
KERNEL_ROWS = 256


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scale (N,)), symmetric per row."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


_DYNAMIC = hasattr(torch.ops.quantized, "linear_dynamic") and any(
    e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def int8_pack_dynamic(weight: torch.Tensor, scale: torch.Tensor) -> object | None:
    """fbgemm's prepacked copy of int8 `weight` (N, K) with per-row `scale` for `int8_linear`'s one-row path, or
    None off the CPU or where this torch lacks the kernel."""
    if not _DYNAMIC or weight.device.type != "cpu":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors; the packing still takes one
        try:
            qw = torch._make_per_channel_quantized_tensor(weight.detach().contiguous(), scale.detach().double(),
                                                         torch.zeros(weight.shape[0], dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qw, None)
        except (RuntimeError, AttributeError, NotImplementedError):
            return None


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor | None = None,
                packed: object | None = None) -> torch.Tensor:
    """y = x @ (weight * scale[:, None]).T in x's dtype. weight int8 (N, K), scale fp32 (N,); `packed` is
    `int8_pack_dynamic(weight, scale)` for the one-row CPU kernel."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.device.type == "cpu" and x2.shape[0] <= KERNEL_ROWS and kernels.available():
        y = kernels.int8_gemv(x2, weight, scale)
    elif packed is not None and x2.shape[0] == 1 and x.device.type == "cpu":
        y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), packed, True)
    elif _INT8PACK and x.device.type == "cpu" and x2.shape[0] <= SMALL_BATCH_ROWS:
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
        self._packed = None  # (weight's data pointer, int8_pack_dynamic's copy), built at the first one-row call
        self.register_load_state_dict_post_hook(Int8Linear._rescale)  # `scale_bf16`, `_packed` are derived

    @staticmethod
    def _rescale(module: Int8Linear, _incompatible: object) -> None:
        with torch.no_grad():
            module.scale_bf16.copy_(module.scale)
        module._packed = None

    def packed(self) -> object | None:
        """fbgemm's copy of this layer's weight (rebuilt when the weight is replaced or reloaded)."""
        if self._packed is None or self._packed[0] != self.weight.data_ptr():
            self._packed = (self.weight.data_ptr(), int8_pack_dynamic(self.weight, self.scale))
        return self._packed[1]

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Linear:
        q, s = quantize_tensor(w)
        return cls(q.to(w.device), s.to(w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_row = x.device.type == "cpu" and x.numel() == x.shape[-1] and not kernels.available()
        return int8_linear(x, self.weight, self.scale, self.scale_bf16, self.packed() if one_row else None)

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
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
_INT4PACK = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_INT4_GROUP_TENSOR = hasattr(torch.ops.quantized, "int4mm_packed_weight_cpu")  # the same kernel, group size a tensor


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


def int4_pack_for_kernel(qweight: torch.Tensor, sz: torch.Tensor) -> torch.Tensor | None:
    """The CPU kernel's second operand beside the plain nibbles: quark's (N, K/32, 2) (scale, zero) table where its
    kernel runs (quark/kernels.py), else torch's packed weight; None off the CPU or without either kernel."""
    if qweight.device.type != "cpu":
        return None
    if kernels.available():
        return kernels.int4_table(sz, qweight.shape[1] * 2 // sz.shape[0])
    if not _INT4PACK:
        return None
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qweight).to(torch.int32), 1)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, packed: torch.Tensor | None = None,
                group: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(qweight).T in x's dtype; qweight (N, K/2) plain nibbles, sz (K/g, N, 2) bf16. `group`, the
    group size as a 0-d tensor, is for compiled graphs (quark/fast.py): torch's int4 op then takes it as an input
    (inductor turns an int into a constant tensor, which dynamo's nested compile regions cannot take)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    N, g = qweight.shape[0], shape[-1] // sz.shape[0]
    if packed is not None and packed.dim() == 3 and x.device.type == "cpu" and x2.shape[0] <= KERNEL_ROWS:
        y = kernels.int4_gemv(x2, qweight, packed)  # quark's kernel: `packed` is its (scale, zero) table
    elif packed is not None and x.device.type == "cpu" and x2.shape[0] <= SMALL_BATCH_ROWS:
        xb = x2.to(torch.bfloat16).contiguous()
        if group is not None and _INT4_GROUP_TENSOR:
            y = torch.ops.quantized.int4mm_packed_weight_cpu(xb, packed, group, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, g, sz)
    else:
        y = F.linear(x2, int4_dequantize(qweight, sz, x.dtype))
    return y.to(x.dtype).view(*shape[:-1], N)


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
        self.register_buffer("packed", int4_pack_for_kernel(qweight, scales_and_zeros), persistent=False)
        self.in_features, self.out_features = qweight.shape[1] * 2, qweight.shape[0]
        self.group_size = self.in_features // scales_and_zeros.shape[0]
        self.register_load_state_dict_post_hook(Int4Linear._repack)  # `packed` is derived, not saved

    @staticmethod
    def _repack(module: Int4Linear, _incompatible: object) -> None:
        """Recompute the kernel's packed copy of freshly loaded nibbles, in place (holders keep the pointer)."""
        packed = int4_pack_for_kernel(module.qweight, module.scales_and_zeros)
        if module.packed is not None and packed is not None and packed.shape == module.packed.shape:
            module.packed.copy_(packed)
        else:
            module.packed = packed

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 32) -> Int4Linear:
        q, sz = quantize_int4_tensor(w, group_size)
        return cls(pack_nibbles(q).to(w.device), sz.to(w.device))

    @property
    def weight(self) -> torch.Tensor:  # device / shape queries and the fast path's change tracking, as nn.Linear
        return self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.qweight, self.scales_and_zeros, self.packed)

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
