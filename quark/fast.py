"""Fast decoding: fused weights under the model's own layer math, and on CUDA a CUDA-graph decode step.

`FastDecoder` is quark/generate.py's `Decoder` with a different `forward`: the same `layer_forward`,
`rms_norm`, `KVCache` and `Context` from quark/model.py, run over fused copies of the weights. What is here is
only what differs: the weight layout, the CPU thread tuner, static buffers + CUDA-graph capture, bucketing.

Choices:
- Weights are fused once per model: q/k/v into one (q+2kv, d) matrix and gate/up into one (2 d_ff, d) matrix, so
  a layer runs 4 matmuls instead of 7. int8/int4 models (quark.quantize) fuse their quantized rows and scales the
  same way. How CPU float copies are laid out: see `matvec` below.
- The copies follow the model: an optimizer step (a global `torch.optim` step hook) or a `load_state_dict` marks
  them stale and the next decoder re-copies them in place; replaced tensors (new storage, `.to()`, quantizing)
  rebuild them. A hand edit of a weight under `no_grad` is the one change not seen: call `refresh(model)`.
- CPU, fp32, one row (batch-1 decode) of a model whose weights exceed the caches (> MATVEC_MIN_BYTES): each
  matmul is `(x * W).sum(-1)` compiled by `torch.compile` (inductor) into one vectorized pass over W (out, in)
  (`matvec`): alone, it made quark-72m decode 1.08x (one thread) to 1.29x (two) faster than MKL's sgemv on an
  AMD EPYC; on the tiny preset, whose weights stay in cache, MKL is faster (dev/LOG.md 2026-12-03). The row
  count is marked dynamic, so a model compiles one kernel per input size (and thread count). With it the float
  copies stay (out, in), as nn.Linear keeps them; without it (`QUARK_CPU_COMPILE=0`, or when compiling fails,
  e.g. no C++ compiler: one warning) they are stored (in, out) and `x @ W` runs MKL (1.5x F.linear at one row).
- CPU where quark's kernels run (quark/kernels.py), int8 or int4 weights, or fp32 weights of a model larger than
  the caches, any number of rows: a decode step is one `quark::decode_layer` call a layer (`_kernel_step`;
  quark/csrc/decode_layer.cpp): `layer_forward`'s math in C++ around quark's matmuls (tested against it on the
  same weights), rows at their own slots under the key mask. The compiled step below spent as long between its
  int8 matmuls (Python wrapper, guards, ~60 small kernels) as in them: one call a layer made quark-72m's int8
  batch-1 step ~1.3x faster; fp32 runs as fast as compiled. Nothing compiles: the first request of a process
  takes 0.03 s (int8) / 0.29 s (fp32) instead of ~10 s (dev/LOG.md 2026-12-03, fifth session). One-row fp32
  matmuls of the fused weights (the lm_head after a prefill) run quark's `f32_gemv` there too.
- CPU without quark's kernels, one row, fp32, int8 or int4 weights of a model larger than the caches: a decode step is
  one compiled call (`_token_step`), each layer a nested compile region (`torch.compiler.nested_compile_region`) over
  `_layer_step` (`layer_forward` over plain tensors, its matmuls `_matvec` reductions; int8 rows dequantized inside
  the reductions, int4 through torch's int4 kernel, an extern call in the graph), so the ~30 small eager ops per layer
  cost nothing apart and the 14 layers one call: every layer runs the same subgraph, compiled once, and every cache
  length and attended span the same graph (both dynamic; a step attends over the slots in use rounded up to SPAN_STEP,
  not the whole cache of `quark chat`/`serve`). Compiling (once per thread count) takes 10-24 s on a fresh machine and
  4-7 s from inductor's disk cache (8-17 s and 2-3.5 s for the per-layer step before: dynamo now traces the whole
  token); quark-72m decodes 1.2x (one thread) to 1.6x (two) faster than eagerly, and one call per token instead of one
  per layer made int8/int4 12-14% faster again at two threads (dev/LOG.md 2026-12-03, third session). A torch without
  nested regions compiles `_layer_step` alone and calls it per layer. Prefill and fp32 batches without quark's kernels
  run eagerly.
- CPU, fp32, several rows (batched decode steps, prefill): oneDNN's linear (`dnnl_linear`), decode batches of up
  to DNNL_PACK_ROWS rows on a packed copy built at first use: MKL's sgemm read the weights at 5-7 GB/s there on an
  AMD EPYC, oneDNN's packed linear at 17-18 (batch-8 decoding 2.2x; dev/LOG.md 2026-12-03).
- CPU decode steps run under quark/cpu_settings.py's thread tuner (QUARK_THREADS=N pins the count instead).
- CUDA: everything the step touches is preallocated (token, per-row position, cache, key mask); the step attends
  over the whole static cache with a mask, is compiled with `torch.compile` (fusing the elementwise work) and
  captured once as a `torch.cuda.CUDAGraph`. A decode step is then: copy token in, replay, sample on the device;
  no host sync. Prefill is compiled separately (dynamic length). Batch size and cache length are bucketed to
  powers of two so a server compiles a few graphs, not one per request; if compiling or capturing fails, it
  falls back (warning once) to eager. The static step always takes per-row slots, so one captured graph serves
  both generate and the serving engine.
- `QUARK_FAST=0` disables the fast path everywhere; `QUARK_COMPILE=0` keeps CUDA graphs but skips torch.compile.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import kernels
from .cpu_settings import Pinned, ThreadTuner, step_runner, threads_setting
from .generate import Decoder, register_fast_decoder
from .model import Block, Context, KVCache, Quark, layer_forward
from .quantize import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    int4_linear,
    int4_pack_for_kernel,
    int8_linear,
    int8_pack_dynamic,
)

_STALE = [0]  # bumped by every optimizer step and load_state_dict; fused copies remember the value they saw


def _weights_changed(*_args) -> None:
    _STALE[0] += 1


register_optimizer_step_post_hook(_weights_changed)


def fast_enabled() -> bool:
    return os.environ.get("QUARK_FAST", "1") != "0"


# ---- CPU one-row matmul as one compiled reduction -------------------------------------------------------------------
_MATVEC: list = []  # [the compiled function], or [None] once compiling failed


def _matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(1, K) row times (N, K) weight -> (N,): inductor fuses the product into the sum (W is read once)."""
    return (x * w).sum(-1)


MATVEC_MIN_BYTES = 64 << 20  # smaller models stay in the CPU's caches, where MKL's gemv is as fast or faster


def _big(model: Quark) -> bool:
    """Whether the model's fp32 weights exceed the CPU's caches (the compiled CPU paths pay off; quantized models
    are judged by their fp32 size, so a model takes the same path at every precision)."""
    return 4 * model.config.n_params() > MATVEC_MIN_BYTES


def cpu_matvec_enabled() -> bool:
    """True unless QUARK_CPU_COMPILE=0 or compiling failed earlier in this process."""
    return os.environ.get("QUARK_CPU_COMPILE", "1") != "0" and _MATVEC != [None] and _STEP != [None]


def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (..., K) holding one row, w (N, K) float32 -> x @ w.T through the compiled kernel; None if it cannot be
    compiled here (the caller runs its eager matmul; warned once)."""
    if not _MATVEC:
        _MATVEC.append(torch.compile(_matvec, dynamic=False))
    if _MATVEC[0] is None:
        return None
    try:
        return _MATVEC[0](x.reshape(1, -1), w).view(*x.shape[:-1], w.shape[0])
    except Exception as e:  # noqa: BLE001 -- a missing compiler must not break decoding
        warnings.warn(f"compiled CPU matmul unavailable ({type(e).__name__}: {str(e)[:200]}); decoding with "
                      "eager matmuls (set QUARK_CPU_COMPILE=0 to skip the attempt)", stacklevel=2)
        _MATVEC[:] = [None]
        return None


def _row_mm(x: torch.Tensor, w: torch.Tensor | tuple) -> torch.Tensor:
    """x (..., K) holding one row times a float (N, K) matrix, int8 (rows, scales, bf16 scales) or int4
    (nibbles, scales_and_zeros (K/group, N, 2), packed, group size): the projections of the compiled CPU step.
    Quantized matrices run `int8_linear` / `int4_linear` (extern kernel calls in the compiled graph: quark's
    kernels, or torch's), except int8 at one row where quark's kernel is unavailable: dequantized inside
    inductor's reduction. Several rows (quantized models' batched steps) always run the quantize.py kernels."""
    if isinstance(w, tuple) and w[1].dim() == 3:  # int4: quantize.py's kernel call (an extern call here)
        return int4_linear(x, *w)
    if isinstance(w, tuple) and (x.numel() != x.shape[-1] or kernels.available()):  # quantize.py's int8 kernels
        return int8_linear(x, *w)
    x1 = x.reshape(1, -1)
    if isinstance(w, tuple):
        q, scale, _ = w
        y = (x1 * q.to(x.dtype)).sum(-1) * scale.to(x.dtype)
    else:
        y = _matvec(x1, w)
    return y.view(*x.shape[:-1], y.shape[-1])


def _layer_step(x: torch.Tensor, weights: tuple, kv: tuple[torch.Tensor, torch.Tensor],
                tables: tuple[torch.Tensor, torch.Tensor], where: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
                consts: tuple) -> torch.Tensor:
    """One decoder layer for one token of each row (quark.model.layer_forward), attending over the first
    `len(span)` slots of the layer's cache `kv` under the mask of `where` (slots (B, 1), key mask or None, span):
    every layer has the same shapes and the cache and span lengths are dynamic (and the row count, above one), so
    this compiles once per case."""
    slots, key_mask, span = where
    ctx = Context.build(tables, 1, cache=KVCache.of([kv[0]], [kv[1]]), slots=slots, key_mask=key_mask,
                        n_keys=span.shape[0])
    return layer_forward(_StepLayer(weights, consts), x, ctx, 0)


SPAN_STEP = 64  # the compiled step attends over the cache slots in use, rounded up to this


def _span(span: torch.Tensor, n_keys: int) -> torch.Tensor:
    """The first n_keys slots of `span` rounded up (at least 2: size 1 would be specialized), marked dynamic."""
    n = min(span.shape[0], max(2, -(-n_keys // SPAN_STEP) * SPAN_STEP))
    view = span[:n]
    torch._dynamo.maybe_mark_dynamic(view, 0)
    return view


_STEP: list = []  # [compiled token step], or [None] once compiling failed
# where torch has it, a layer is a nested compile region: one graph per token runs every layer's call of the same
# compiled subgraph (compiled once, as the per-layer step was), so a token is one compiled call, not one per layer
_LAYER = getattr(torch.compiler, "nested_compile_region", lambda f: None)(_layer_step)


def _token_step(x: torch.Tensor, layers: list[tuple[tuple, tuple]], kvs: list[tuple[torch.Tensor, torch.Tensor]],
                tables: tuple[torch.Tensor, torch.Tensor], where: tuple, layer: Callable | None = None) -> torch.Tensor:
    """Every layer's `_layer_step` for one token of each row (`layers`: each layer's `FusedLayer.step_args`)."""
    for (weights, consts), kv in zip(layers, kvs):
        x = (layer or _LAYER)(x, weights, kv, tables, where, consts)
    return x


# inductor checks every buffer's size and stride in the compiled step's Python wrapper (~400 checks a token of
# quark-72m, ~0.25 ms; +4-8% int8 decode without them, dev/LOG.md): dynamo's guards already check the inputs, and
# the tests compare the step's logits with the eager path's for every weight kind
_STEP_ASSERTS = ("size_asserts", "alignment_asserts", "scalar_asserts")


def compiled_token_step() -> Callable | None:
    """The compiled `_token_step`: one graph per token, or without nested regions (older torch) a loop over the
    compiled `_layer_step`."""
    if not _STEP:
        import torch._inductor.config as inductor_config

        options = {k: False for k in _STEP_ASSERTS if hasattr(inductor_config, k)}  # (older torch lacks some)
        if _LAYER is not None:
            _STEP.append(torch.compile(_token_step, fullgraph=True, dynamic=False, options=options))
        else:
            layer = torch.compile(_layer_step, fullgraph=True, dynamic=False, options=options)
            _STEP.append(functools.partial(_token_step, layer=layer))
    return _STEP[0]


# ---- CPU matmuls of several rows: oneDNN -----------------------------------------------------------------------------
DNNL_PACK_ROWS = 8  # calls of up to this many rows (batched decode steps) use a oneDNN-packed copy of the weight
_DNNL: list = []  # [False] once oneDNN's linear failed in this process


def dnnl_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) @ w.T through oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor's frozen CPU
    graphs use), w float32 (N, K) or `dnnl_pack(w)`; None where this torch has no oneDNN (the caller runs
    F.linear). On AMD EPYC, MKL's sgemm reads fp32 weights at 2-6 GB/s for 2-64 rows, oneDNN at 4-18
    (bench/cpu_kernels.py --rows 8)."""
    if _DNNL == [False]:
        return None
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        warnings.warn(f"oneDNN linear unavailable ({type(e).__name__}: {str(e)[:200]}); CPU batches use MKL",
                      stacklevel=2)
        _DNNL[:] = [False]
        return None
    return y


def dnnl_pack(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of float32 w (N, K) for calls of up to DNNL_PACK_ROWS rows (None without oneDNN)."""
    if _DNNL == [False]:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, DNNL_PACK_ROWS)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


class FusedLinear:
    """One matmul over the rows of several Linear / Int8Linear / Int4Linear modules stacked (no copy for a single
    quantized module). `transposed` (float weights) keeps the stack as one contiguous (in, out) matrix."""

    def __init__(self, mods: list[nn.Module], transposed: bool = False):
        kinds = {type(m) for m in mods}
        if len(kinds) != 1 or not all(isinstance(m, (nn.Linear, Int8Linear, Int4Linear)) for m in mods):
            raise TypeError("FusedLinear needs modules that are all nn.Linear, all Int8Linear or all Int4Linear")
        self.mods = mods
        self.int8, self.int4 = isinstance(mods[0], Int8Linear), isinstance(mods[0], Int4Linear)
        self.transposed = transposed and not (self.int8 or self.int4)
        self.matvec = False  # set below for float weights
        if self.int4:  # plain nibbles concatenated, then packed once for the kernel (its packing mixes rows)
            one = len(mods) == 1
            self.weight = mods[0].qweight if one else torch.cat([m.qweight for m in mods])
            self.sz = mods[0].scales_and_zeros if one else torch.cat([m.scales_and_zeros for m in mods], dim=1)
            self.packed = mods[0].packed if one else int4_pack_for_kernel(self.weight, self.sz)
            self.group = torch.tensor(mods[0].group_size)  # `int4_linear`'s graph operand (fused modules share it)
            return
        self.weight = self._stack("weight")
        if self.transposed:
            self.weight = self.weight.t().contiguous()
        # CPU fp32 (out, in): several rows at once through oneDNN (a packed copy for decode batches, built at first
        # use); one row through `matvec`, whose row count is dynamic (one kernel per input size)
        self.dnnl = (not (self.int8 or self.transposed) and self.weight.device.type == "cpu"
                     and self.weight.dtype == torch.float32)
        self._dnnl_packed = None
        self.matvec = self.dnnl and cpu_matvec_enabled()
        if self.matvec:
            torch._dynamo.maybe_mark_dynamic(self.weight, 0)  # a hint: a caller may specialize
        self.scale = self._stack("scale") if self.int8 else None
        self.scale_bf16 = self.scale.to(torch.bfloat16) if self.int8 else None
        self.packed = self._pack() if self.int8 else None

    def _pack(self) -> object | None:
        """fbgemm's copy for one-row int8 matmuls (quark/quantize.py); a single module's own copy is shared."""
        if kernels.available():  # quark's own kernel takes the plain rows
            return None
        return self.mods[0].packed() if len(self.mods) == 1 else int8_pack_dynamic(self.weight, self.scale)

    def kernel_operands(self) -> list[torch.Tensor] | None:
        """This matrix as quark::decode_layer takes it: [int8 rows, scales], [int4 nibbles, quark's (scale, zero)
        table] or [fp32 (out, in) weight]; None where quark's kernels do not run or the layout is another."""
        if not kernels.available():
            return None
        if self.int8:
            return [self.weight, self.scale]
        if self.int4:
            return [self.weight, self.packed] if self.packed is not None and self.packed.dim() == 3 else None
        return [self.weight] if not self.transposed and self.weight.dtype == torch.float32 else None

    def _stack(self, name: str) -> torch.Tensor:
        ts = [getattr(m, name).detach() for m in self.mods]
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    def sources(self) -> list[torch.Tensor]:
        names = ("qweight", "scales_and_zeros") if self.int4 else ("weight", "scale") if self.int8 else ("weight",)
        return [getattr(m, n) for m in self.mods for n in names]

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-copy the (same-storage) sources into the fused copies in place (CUDA graphs keep their pointers)."""
        if self.int4:
            if len(self.mods) > 1:
                self.weight.copy_(torch.cat([m.qweight for m in self.mods]))
                self.sz.copy_(torch.cat([m.scales_and_zeros for m in self.mods], dim=1))
                if self.packed is not None:
                    self.packed.copy_(int4_pack_for_kernel(self.weight, self.sz))
            return
        self._dnnl_packed = None
        if self.transposed:
            self.weight.copy_(torch.cat([m.weight.detach() for m in self.mods]).t())
        elif len(self.mods) > 1:
            torch.cat([m.weight.detach() for m in self.mods], out=self.weight)
        if self.int8:
            if len(self.mods) > 1:
                torch.cat([m.scale for m in self.mods], out=self.scale)
            self.scale_bf16.copy_(self.scale)
            if len(self.mods) == 1:  # the module's copy follows pointer changes and loads, not in-place edits
                self.mods[0]._packed = None
            self.packed = self._pack()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4:
            return int4_linear(x, self.weight, self.sz, self.packed)
        if self.int8:
            return int8_linear(x, self.weight, self.scale, self.scale_bf16, self.packed)
        if self.transposed:
            return x @ self.weight
        rows = x.numel() // x.shape[-1]
        if self.dnnl and rows == 1 and x.dtype == torch.float32 and kernels.available():  # nothing to compile
            return kernels.f32_gemv(x.reshape(1, -1), self.weight).view(*x.shape[:-1], -1)
        if self.matvec and rows == 1 and x.dtype == torch.float32:
            y = matvec(x, self.weight)
            if y is not None:
                return y
        if (self.dnnl and rows > 1 and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            w = self.weight
            if rows <= DNNL_PACK_ROWS:
                if self._dnnl_packed is None:
                    self._dnnl_packed = dnnl_pack(self.weight)
                w = self._dnnl_packed if self._dnnl_packed is not None else w
            y = dnnl_linear(x.reshape(rows, -1), w)
            if y is not None:
                return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.weight)


class FusedLayer:
    """A decoder layer in the fused layout, with the interface `quark.model.layer_forward` reads."""

    def __init__(self, blk: Block, transposed: bool):
        a, m = blk.self_attn, blk.mlp
        self.ln1, self.ln2, self.eps, self.hd = blk.ln1, blk.ln2, blk.eps, blk.hd
        self.split = [a.q_proj.out_features // blk.hd, a.k_proj.out_features // blk.hd, a.v_proj.out_features // blk.hd]
        self.qkv_p = FusedLinear([a.q_proj, a.k_proj, a.v_proj], transposed)
        self.o = FusedLinear([a.o_proj], transposed)
        self.gate_up_p = FusedLinear([m.gate_proj, m.up_proj], transposed)
        self.down = FusedLinear([m.down_proj], transposed)
        self.linears = [self.qkv_p, self.o, self.gate_up_p, self.down]
        # (tensors, constants) of `_layer_step`: a matrix is the float (out, in) copy, int8 (rows, scales, bf16
        # scales) or int4 (nibbles, scales_and_zeros, packed, group size), `_row_mm`'s operands; the copies are
        # refreshed in place, so these references stay valid. A float matrix is passed as an alias without
        # `matvec`'s dynamic-size hint: the layer graph is static (a hinted size also breaks dynamo's nested regions)
        mats = [(lin.weight, lin.scale, lin.scale_bf16) if lin.int8 else (lin.weight, lin.sz, lin.packed, lin.group)
                if lin.int4 else lin.weight.view(lin.weight.shape) for lin in self.linears]
        self.step_args = (self.ln1, self.ln2, *mats), (self.eps, self.hd, tuple(self.split))
        # quark::decode_layer's operands (quark/kernels.py) where every matrix has them, all quantized or all fp32
        mats = [lin.kernel_operands() for lin in self.linears]
        one_kind = len({lin.int8 or lin.int4 for lin in self.linears}) == 1
        self.kernel_args = ((self.ln1.detach(), self.ln2.detach(), self.eps, *mats)
                            if one_kind and all(m is not None for m in mats) else None)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv_p(x).view(*x.shape[:2], -1, self.hd).split(self.split, dim=2)  # heads of q, k, v

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.gate_up_p(x).chunk(2, dim=-1)


class _StepLayer(FusedLayer):
    """`FusedLayer`'s interface over plain tensors, for the compiled CPU step: its projections are `_row_mm`
    reductions; `qkv` and `gate_up` are FusedLayer's. (No modules here, so FusedLayer.__init__ is not called.)"""

    def __init__(self, tensors: tuple, consts: tuple):
        """`tensors` (ln1, ln2, qkv, o, gate_up, down) and `consts` (eps, head_dim, q/k/v head counts), as
        `FusedLayer.step_args` holds them."""
        self.ln1, self.ln2, *mats = tensors
        self.eps, self.hd, split = consts
        self.split = list(split)
        self.qkv_p, self.o, self.gate_up_p, self.down = (functools.partial(_row_mm, w=w) for w in mats)


class FusedWeights:
    """The per-model weights of the fast path, shared by all decoders of that model."""

    def __init__(self, model: Quark, transposed: bool = False):
        self.embed = model.model.embed_tokens
        self.layers = [FusedLayer(blk, transposed) for blk in model.model.layers]
        self.norm = model.model.norm  # the model's RMSNorm module: its math is quark.model.rms_norm
        self.lm_head = FusedLinear([model.lm_head], transposed)
        self.tables = (model.rope_cos, model.rope_sin)
        self.linears = [lin for layer in self.layers for lin in layer.linears] + [self.lm_head]
        self.step_layers = [layer.step_args for layer in self.layers]  # `_token_step`'s operands
        # each layer's quark::decode_layer operands, if every layer has them and the activations are float32
        self.kernel_layers = ([layer.kernel_args for layer in self.layers] if model.dtype == torch.float32 and all(
            layer.kernel_args is not None for layer in self.layers) else None)
        self.warm: set[bool] = set()  # step kinds (several rows or one) compiled at every tuner count
        self.ptrs = self._ptrs(model)
        self.seen = _STALE[0]

    def _ptrs(self, model: Quark) -> list[int]:
        held = [self.embed.weight, self.norm.weight, *self.tables] + [t for blk in model.model.layers for t in (blk.ln1, blk.ln2)]
        return [t.data_ptr() for t in held + [t for lin in self.linears for t in lin.sources()]]

    def fresh(self, model: Quark) -> bool:
        """Bring the fused copies up to date; False if the model's tensors were replaced (the caller rebuilds)."""
        if self._ptrs(model) != self.ptrs:
            return False
        if self.seen != _STALE[0]:
            for lin in self.linears:
                lin.refresh()
            self.seen = _STALE[0]
        return True


class FastDecoder(Decoder):
    """`Decoder` over fused weights; on CUDA (`use_graph`) a static, captured decode step."""

    def __init__(self, model: Quark, weights: FusedWeights, batch_size: int, max_len: int, *, use_graph: bool = False,
                 use_compile: bool = False, runner: ThreadTuner | Pinned | None = None):
        quantized = all(lin.int8 or lin.int4 for layer in weights.layers for lin in layer.linears)
        # CPU int8/int4 layers with quark's kernels, and fp32 ones of a model larger than the caches: a step is one
        # quark::decode_layer call a layer, any row count
        self.kernel_step = (model.device.type == "cpu" and not use_graph and weights.kernel_layers is not None
                            and (quantized or _big(model)))
        # otherwise CPU, one row, fp32 (out, in), int8 or int4 weights: each layer of a step is one compiled call
        # (`_layer_step`)
        self.cpu_step = (not self.kernel_step and model.device.type == "cpu" and not use_graph and cpu_matvec_enabled()
                         and _big(model) and all(lin.matvec or lin.int8 or (lin.int4 and lin.packed is not None)
                                                 for lin in weights.linears))
        # the compiled step attends over `_span` slots <= max_len; with a spare slot that is always fewer than the
        # cache holds (the first compile would otherwise specialize on equal lengths, and a second one follow)
        super().__init__(model, batch_size, max_len, spare_slots=int(self.cpu_step))
        self.w = weights
        self.use_graph, self.use_compile = use_graph, use_compile
        self.graph = None
        # CPU decode steps run at a thread count tuned from their own timings (quark/cpu_settings.py)
        self.runner = (runner or step_runner()) if self.device.type == "cpu" else None
        # batched steps too for int8/int4 layers (their kernels take rows; fp32 batches run oneDNN eagerly)
        self.cpu_step_rows = self.cpu_step and quantized
        if self.kernel_step and isinstance(self.runner, ThreadTuner):  # nothing to compile: first steps are measured
            self.runner.compiled_at(self.runner.cands)
        if self.cpu_step:
            for t in self.cache.k + self.cache.v:  # any cache length runs the same compiled code
                torch._dynamo.maybe_mark_dynamic(t, 2)
            self.span = torch.empty(max_len, dtype=torch.uint8)  # its length says how many slots a step attends
        self._compiled_forward = None
        if use_graph:
            self.static_tok = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
            self.static_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # per-row slots
            if use_compile:
                self._compiled_forward = torch.compile(self.forward, dynamic=True)

    @property
    def busy(self) -> bool:
        return self._busy

    @busy.setter
    def busy(self, value: bool) -> None:
        self._busy = value
        if not value and getattr(self, "runner", None) is not None:  # a generation let go: torch's own count
            self.runner.release()

    def forward(self, idx: torch.Tensor, cache: KVCache, slots: int | torch.Tensor, key_mask: torch.Tensor | None,
                n_keys: int | None, last: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel_step and idx.shape[1] == 1:
            return self._kernel_step(idx, cache, slots, key_mask, n_keys)
        if self.cpu_step and idx.shape[1] == 1 and (idx.shape[0] == 1 or self.cpu_step_rows):
            out = self._cpu_step(idx, cache, slots, key_mask, n_keys)
            if out is not None:
                return out
        ctx = Context.build(self.w.tables, idx.shape[1], cache=cache, slots=slots, key_mask=key_mask, n_keys=n_keys)
        x = self.w.embed(idx)
        for i, layer in enumerate(self.w.layers):
            x = layer_forward(layer, x, ctx, i)
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return self.w.lm_head(self.w.norm(x)).float()

    def _kernel_step(self, idx: torch.Tensor, cache: KVCache, slots: int | torch.Tensor,
                     key_mask: torch.Tensor | None, n_keys: int | None) -> torch.Tensor:
        """One token of each row through quark::decode_layer, a call a layer (`layer_forward`'s math in C++,
        quark/csrc/decode_layer.cpp), attending over the first `n_keys` slots (all without it)."""
        B = idx.shape[0]
        x = self.w.embed(idx).reshape(B, -1).contiguous()  # (B, D), updated in place by every layer
        slots = torch.full((B,), slots) if isinstance(slots, int) else slots.reshape(B).long()
        n = n_keys or cache.max_len
        for args, k, v in zip(self.w.kernel_layers, cache.k, cache.v):
            kernels.decode_layer(x, args, (k, v), self.w.tables, slots, key_mask=key_mask, n_keys=n)
        return self.w.lm_head(self.w.norm(x)).float()

    def _cpu_step(self, idx: torch.Tensor, cache: KVCache, slots: int | torch.Tensor,
                  key_mask: torch.Tensor | None, n_keys: int | None) -> torch.Tensor | None:
        """One token of each row (one row, or several for quantized layers) through the compiled token step,
        attending over the first `n_keys` slots (rounded up; all without it); None if it cannot compile here
        (warned once; the caller's eager path reruns the token, rewriting the same cache slots)."""
        step = compiled_token_step()
        if step is None:
            return None
        B = idx.shape[0]
        if key_mask is not None:
            torch._dynamo.maybe_mark_dynamic(key_mask, 1)  # as long as the cache
        slots = torch.full((B, 1), slots) if isinstance(slots, int) else slots.reshape(B, 1)
        x = self.w.embed(idx)
        kvs = [(cache.k[i], cache.v[i]) for i in range(len(self.w.layers))]
        if B > 1:  # one graph for every batch size above one
            for t in (x, slots, *(t for kv in kvs for t in kv)) + ((key_mask,) if key_mask is not None else ()):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        where = (slots, key_mask, _span(self.span, n_keys or self.max_len))
        try:
            self._compile_every_count(step, (x, self.w.step_layers, kvs, self.w.tables, where), B > 1)
            x = step(x, self.w.step_layers, kvs, self.w.tables, where)
        except Exception as e:  # noqa: BLE001 -- a missing compiler must not break decoding
            warnings.warn(f"compiled CPU decode step unavailable ({type(e).__name__}: {str(e)[:200]}); decoding "
                          "eagerly (set QUARK_CPU_COMPILE=0 to skip the attempt)", stacklevel=3)
            _STEP[:] = [None]
            return None
        return self.w.lm_head(self.w.norm(x[:, -1])).float()

    def _compile_every_count(self, step: Callable, args: tuple, rows: bool) -> None:
        """The first one-row (or several-row) step of this model under a thread tuner runs the step once at each
        count the tuner may try: dynamo compiles a graph per thread count, so the tuner's first probe of a count
        would otherwise stall a later token for the whole compile (seconds, measured: 4-8 s from the disk cache;
        batch-8 streams lost a third of their speed in bench/llamacpp.py). Rerunning a step writes the same
        cache slots with the same values."""
        if not isinstance(self.runner, ThreadTuner) or rows in self.w.warm:
            return
        self.w.warm.add(rows)
        current = torch.get_num_threads()
        for n in self.runner.cands:
            if n != current:
                torch.set_num_threads(n)
                step(*args)
        torch.set_num_threads(current)
        self.runner.compiled_at(self.runner.cands)

    def prefill_forward(self, *args) -> torch.Tensor:
        """Prefill at torch's own thread count; on CUDA through the compiled forward (eager if compiling fails)."""
        if self.runner is not None:
            self.runner.release()
        if self._compiled_forward is not None:
            try:
                return self._compiled_forward(*args)
            except Exception as e:  # noqa: BLE001 -- compile problems must not break generation
                warnings.warn(f"compiled prefill failed ({type(e).__name__}: {e}); using eager prefill", stacklevel=3)
                self._compiled_forward = None
        return self.forward(*args)

    def decode(self, tok: torch.Tensor, slots: int | torch.Tensor, n_keys: int | None) -> torch.Tensor:
        if self.use_graph:
            b = tok.shape[0]
            self.static_tok[:b].copy_(tok)
            if isinstance(slots, int):
                self.static_pos.fill_(slots)  # a host scalar written into device memory: no sync
            else:
                self.static_pos[:b].copy_(slots)
            return self._graph_step()[:b]
        if self.runner is None:
            return super().decode(tok, slots, n_keys)
        return self.runner.run(lambda: super(FastDecoder, self).decode(tok, slots, n_keys))

    def _static_step(self):
        """All B rows, each at its own slot, over the whole cache (masked): static shapes for CUDA graphs."""
        return self.forward(self.static_tok, self.cache, self.static_pos, self.key_mask, self.max_len)

    def _graph_step(self):
        if self.graph is None:
            if self.device.type == "cuda":
                self._capture()
            else:  # the static step also runs eagerly elsewhere (tested on CPU)
                self.graph = False
        if self.graph is False:
            return self._static_step()
        self.graph.replay()
        return self.static_out

    def _capture(self):
        """Compile the static step (if asked) and capture it once as a CUDA graph; eager fallback on failure."""
        saved = [t.clone() for t in self.cache.k + self.cache.v]  # warm-up steps write a slot: restore it after
        try:
            fn = torch.compile(self._static_step, fullgraph=True, dynamic=False) if self.use_compile else self._static_step
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_out = fn()
            self.graph = graph
        except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager
            warnings.warn(f"CUDA-graph decode unavailable ({type(e).__name__}: {e}); decoding eagerly", stacklevel=3)
            self.graph = False
        for t, s in zip(self.cache.k + self.cache.v, saved):
            t.copy_(s)


# ---- per-model registry -------------------------------------------------------------------------------------------
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pow2(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


_PLAIN_FORWARD, _PLAIN_HIDDEN = Quark.forward, Quark.hidden


def supports_fast(model: nn.Module) -> bool:
    """The fast path handles the Quark architecture (float, int8 or int4 weights). A model whose `forward` or
    `hidden` was overridden (a subclass or a patch) keeps the plain path, so the override is honoured."""
    return (fast_enabled() and isinstance(model, Quark) and type(model).forward is _PLAIN_FORWARD
            and type(model).hidden is _PLAIN_HIDDEN
            and isinstance(model.model.embed_tokens, (nn.Embedding, Int8Embedding)))


def refresh(model: Quark) -> None:
    """Re-copy `model`'s fused weights now (after editing weights by hand; optimizer steps and
    `load_state_dict` are seen without it)."""
    _weights_changed()
    for weights in _REGISTRY.get(model, {}).get("weights", {}).values():
        weights.fresh(model)


def decoder_for(model: Quark, batch_size: int, max_len: int) -> FastDecoder | None:
    """A FastDecoder for `model` with room for `batch_size` rows and `max_len` slots (reused on CUDA), or None
    for a model the fast path does not take."""
    if not supports_fast(model):
        return None
    transposed = model.device.type != "cuda" and not (cpu_matvec_enabled() and model.dtype == torch.float32
                                                      and _big(model))
    entry = _REGISTRY.get(model)
    if entry is None:
        entry = _REGISTRY[model] = {"weights": {}, "decoders": {}}  # weights by layout (transposed or not)
        model.register_load_state_dict_post_hook(_weights_changed)
    weights = entry["weights"].get(transposed)
    if weights is None or not weights.fresh(model):
        weights = entry["weights"][transposed] = FusedWeights(model, transposed)
        entry["decoders"] = {}  # captured decoders hold the replaced weights
    if model.device.type != "cuda":  # the thread tuner is kept per model, batch size and QUARK_THREADS setting
        key = ("runner", batch_size, threads_setting())
        if key not in entry:
            entry[key] = step_runner()
        return FastDecoder(model, weights, batch_size, max_len, runner=entry[key])
    B, L = _pow2(batch_size, 1), min(_pow2(max_len + 1, 256), model.config.context_length)
    key = (B, L, model.dtype)
    dec = entry["decoders"].get(key)
    if dec is not None and dec.busy:  # another generation is using the captured one: an eager one for this call
        return FastDecoder(model, weights, batch_size, max_len)
    if dec is None:
        use_compile = os.environ.get("QUARK_COMPILE", "1") != "0"
        dec = entry["decoders"][key] = FastDecoder(model, weights, B, L, use_graph=True, use_compile=use_compile)
    return dec


register_fast_decoder(decoder_for)
