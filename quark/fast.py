"""Fast decoding: fused weights under the model's own layer math, and one way to run a decode step, chosen once.

`FastDecoder` is quark/generate.py's `Decoder` over fused copies of the weights: q/k/v stacked into one (q+2kv, d)
matrix and gate/up into one (2 d_ff, d) (int8 / int4 rows and their scales the same way), so a layer runs 4
matmuls instead of 7. Its math is quark/model.py's `layer_forward`, or that function's C++ copy.

Choices:
- `decoder_for` picks the decode step once and the decoder holds it:
  `KernelStep` (CPU where quark's kernels run, quark/kernels.py: fp32 activations, any weights): one
  `decode_layer` call a layer (quark/csrc/layer.h), any row count; `EagerStep` (CPU otherwise: no compiler,
  QUARK_CPU_ISA=torch, bf16 activations): `layer_forward` over the fused layers in eager torch; `GraphStep`
  (CUDA): static buffers and the step captured as a CUDA graph (torch.compile'd first unless QUARK_COMPILE=0).
  `KernelStep` prefills prompts of up to its `max_rows` tokens in all the same way, their tokens as the rows of
  one `decode_layer` call a layer, and longer ones through the model's own modules; the other steps' prefills are
  `layer_forward` over the fused layers (on CUDA compiled).
- When the fused copies are made: a CPU decoder makes them from the model's weights when it is made, and
  `decoder_for` makes a decoder at every call (`generate`: one per call; the serving engine and `quark.load`: one
  per load), so weights trained, loaded or edited between generations are always seen and nothing watches them.
  The CUDA decoder is kept per model and shape for its captured graph and re-copies the weights into the same
  buffers at every `decoder_for` call.
- On a CPU the copies (all of them, o / down / lm_head included) share one buffer Linux backs with 2 MiB pages
  (`HugePageArena`): streaming the weights once a token on 4 KiB pages spends a TLB miss every 4 KiB.
- Where quark's kernels run, the fp32 copies are in `kernels.f32_pack`'s layout and every matmul of them (the
  layers', the lm_head's) is `f32_gemv`: it reads the weight once for all rows, at the memory's speed, where MKL's
  sgemm at a few rows does not. A prefill of more than F32_KERNEL_ROWS tokens, where the sgemm is faster, runs the
  model's own modules (`Decoder.forward`).
- CPU prefills and decode steps run on the cores other processes leave free (quark/cpu_settings.py).
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cpu_settings import Threads
from .generate import Decoder, register_fast_decoder
from .model import Block, Context, KVCache, Quark, layer_forward
from .quantize import KERNEL_ROWS, Int4Linear, Int8Embedding, Int8Linear, int4_linear, int4_pack_for_torch, int8_linear

F32_KERNEL_ROWS = 128  # prompt tokens in all that KernelStep prefills; past ~192 torch's sgemm is faster (dev/LOG.md)
HUGE_PAGE = 2 << 20  # bytes: x86-64's and most ARM64 Linux kernels' transparent huge page
# the tensors a fused matrix stacks, by the kind of its modules (int4: the kernels' table is None off the CPU)
_PARTS = {nn.Linear: ("weight",), Int8Linear: ("weight", "scale"), Int4Linear: ("qweight", "scales_and_zeros", "table")}


def huge_page_empty(shape: list[int], dtype: torch.dtype) -> torch.Tensor | None:
    """An uninitialized CPU tensor in memory that Linux backs with 2 MiB pages (transparent huge pages, asked for
    with madvise, which is what the kernel's default "madvise" mode honours), or None where that is not to be had
    (another OS, or less than one huge page). A decode step streams every weight once a token; on 4 KiB pages that
    costs a TLB miss every 4 KiB."""
    n = math.prod(shape) * dtype.itemsize
    if n < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        buf = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # the tensor keeps it alive
        raw = torch.frombuffer(buf, dtype=torch.uint8)
        at = -raw.data_ptr() % HUGE_PAGE  # a multiple of the 4 KiB page: mmap's memory is page aligned
        buf.madvise(mmap.MADV_HUGEPAGE, at, n)
    except (OSError, ValueError):
        return None
    return raw[at:at + n].view(dtype).view(shape)


class HugePageArena:
    """CPU tensors carved one after another out of one `huge_page_empty` buffer: a decoder's weights share it, since
    a buffer per matrix would leave each one's last partial 2 MiB (and every matrix under 2 MiB) on small pages."""

    ALIGN = 64  # bytes: each tensor starts on a cache line

    def __init__(self, nbytes: int):
        self.buf = huge_page_empty([nbytes], torch.uint8)
        self.used = 0

    @staticmethod
    def size(tensors: list[torch.Tensor]) -> int:
        """Bytes that `take`s of these tensors' sizes need."""
        return sum(t.numel() * t.element_size() + HugePageArena.ALIGN for t in tensors)

    def take(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor | None:
        """The next uninitialized (shape, dtype) tensor of the buffer, or None without a buffer or room."""
        if self.buf is None:
            return None
        n, at = math.prod(shape) * dtype.itemsize, -(-self.used // self.ALIGN) * self.ALIGN
        if at + n > self.buf.numel():
            return None
        self.used = at + n
        return self.buf[at:at + n].view(dtype).view(shape)


class FusedLinear:
    """One matmul over the rows of several Linear / Int8Linear / Int4Linear modules stacked. With an `arena` (a CPU
    decoder's) every part is a copy in its huge-page memory, a single module's too; without one, or when the arena has
    no buffer, a single module's own tensors are used uncopied. fp32 weights where quark's kernels run are always a
    copy, in `kernels.f32_pack`'s layout, which only `kernels.f32_gemv` reads."""

    def __init__(self, mods: list[nn.Module], arena: HugePageArena | None = None):
        kinds = {type(m) for m in mods}
        if len(kinds) != 1 or not kinds <= set(_PARTS):
            raise TypeError("FusedLinear needs modules that are all nn.Linear, all Int8Linear or all Int4Linear")
        self.mods, self.kind = mods, type(mods[0])
        w = mods[0].weight if self.kind is not Int4Linear else mods[0].qweight
        ours = w.device.type == "cpu" and kernels.available()
        # the kernels' tier for fp32 weights, found here, not per call (a compiled graph calling this must not trace
        # the CPU's flags, and finding it reads the environment: a large share of a small model's step at every call)
        self.f32_tier = kernels.chosen_tier() if self.kind is nn.Linear and w.dtype == torch.float32 and ours else None
        self.parts = [self._stack(name, arena) for name in _PARTS[self.kind]]
        self.torch_packed = int4_pack_for_torch(self.parts[0]) if self.kind is Int4Linear and not ours else None

    def _tensors(self, name: str) -> list[torch.Tensor] | None:
        ts = [getattr(m, name) for m in self.mods]
        return None if ts[0] is None else [t.detach() for t in ts]

    @staticmethod
    def _dim(name: str) -> int:
        """The dim a part stacks its modules' tensors along (int4's scales_and_zeros are (K/group, N, 2))."""
        return 1 if name == "scales_and_zeros" else 0

    def _stack(self, name: str, arena: HugePageArena | None) -> torch.Tensor | None:
        ts = self._tensors(name)
        if ts is None:
            return None
        dim = self._dim(name)
        shape = list(ts[0].shape)
        shape[dim] = sum(t.shape[dim] for t in ts)
        out = arena.take(shape, ts[0].dtype) if arena is not None else None
        if self.f32_tier is not None:
            return kernels.f32_pack(_joined(ts, dim), out)
        if out is not None:
            return torch.cat(ts, dim=dim, out=out)
        return _joined(ts, dim)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the modules' current weights into the fused copies, in place (a CUDA graph keeps their pointers)."""
        for part, name in zip(self.parts, _PARTS[self.kind]):
            ts = self._tensors(name)
            if self.f32_tier is not None:
                kernels.f32_pack(_joined(ts, 0), part)
            elif part is not None and not (len(ts) == 1 and ts[0].data_ptr() == part.data_ptr()):
                torch.cat(ts, dim=self._dim(name), out=part)

    def kernel_operands(self) -> list[torch.Tensor] | None:
        """This matrix as quark::decode_layer takes it: [fp32 weight], [int8 rows, scales] or [int4 nibbles, table]."""
        if self.kind is Int4Linear:
            return None if self.parts[2] is None else [self.parts[0], self.parts[2]]
        if self.kind is Int8Linear:
            return self.parts
        return self.parts if self.parts[0].dtype == torch.float32 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind is Int4Linear:
            return int4_linear(x, *self.parts, self.torch_packed)
        if self.kind is Int8Linear:
            return int8_linear(x, *self.parts)
        if self.f32_tier is not None:
            out = kernels.f32_gemv(x.reshape(-1, x.shape[-1]), self.parts[0], self.f32_tier)
            return out.to(x.dtype).view(*x.shape[:-1], -1)
        return F.linear(x, self.parts[0])


def _joined(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The tensors concatenated along `dim`; a single one as it is, not copied."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=dim)


class FusedLayer:
    """A decoder layer in the fused layout, with the interface `quark.model.layer_forward` reads."""

    def __init__(self, blk: Block, arena: HugePageArena | None = None):
        a, m = blk.self_attn, blk.mlp
        self.ln1, self.ln2, self.eps, self.hd = blk.ln1, blk.ln2, blk.eps, blk.hd
        self.split = [a.q_proj.out_features // blk.hd, a.k_proj.out_features // blk.hd, a.v_proj.out_features // blk.hd]
        self.qkv_p = FusedLinear([a.q_proj, a.k_proj, a.v_proj], arena)
        self.o = FusedLinear([a.o_proj], arena)
        self.gate_up_p = FusedLinear([m.gate_proj, m.up_proj], arena)
        self.down = FusedLinear([m.down_proj], arena)
        self.linears = [self.qkv_p, self.o, self.gate_up_p, self.down]

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv_p(x).view(*x.shape[:2], -1, self.hd).split(self.split, dim=2)  # heads of q, k, v

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.gate_up_p(x).chunk(2, dim=-1)

    def kernel_args(self) -> tuple | None:
        """quark::decode_layer's operands (ln1, ln2, eps, qkv, o, gate_up, down), or None if a matrix has none."""
        mats = [lin.kernel_operands() for lin in self.linears]
        return None if None in mats else (self.ln1.detach(), self.ln2.detach(), self.eps, *mats)


class FusedWeights:
    """A model's weights in the fused layout, made from its current weights."""

    def __init__(self, model: Quark):
        arena = None
        if model.device.type == "cpu":
            parts = [t for mods in _modules(model) for m in mods for name in _PARTS.get(type(m), ())
                     if (t := getattr(m, name)) is not None]
            arena = HugePageArena(HugePageArena.size(parts))
        self.embed = model.model.embed_tokens
        self.layers = [FusedLayer(blk, arena) for blk in model.model.layers]
        self.norm = model.model.norm  # the model's RMSNorm module: its math is quark.model.rms_norm
        self.lm_head = FusedLinear([model.lm_head], arena)
        self.tables = (model.rope_cos, model.rope_sin)
        self.linears = [lin for layer in self.layers for lin in layer.linears] + [self.lm_head]

    def refresh(self, model: Quark) -> None:
        """Copy `model`'s current weights in place; LookupError if its modules were replaced (quantized, say)."""
        if [m for lin in self.linears for m in lin.mods] != [m for lin in _modules(model) for m in lin]:
            raise LookupError("the model's modules were replaced")
        for lin in self.linears:
            lin.refresh()


def _modules(model: Quark) -> list[list[nn.Module]]:
    """The modules each FusedLinear of `model` stacks, in FusedWeights' order."""
    out = []
    for blk in model.model.layers:
        a, m = blk.self_attn, blk.mlp
        out += [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]]
    return out + [[model.lm_head]]


# ---- the three decode steps ----------------------------------------------------------------------------------------
class EagerStep:
    """`layer_forward` over the fused layers in eager torch."""

    def __init__(self, dec: FastDecoder):
        pass

    def prefill(self, dec: FastDecoder, *args) -> torch.Tensor:
        return dec.forward(*args)

    def decode(self, dec: FastDecoder, tok: torch.Tensor, slots: int | torch.Tensor, n_keys: int | None) -> torch.Tensor:
        return Decoder.decode(dec, tok, slots, n_keys)


class KernelStep(EagerStep):
    """One token of each row through quark::decode_layer, a call a layer (quark/csrc/layer.h); prompts too, their
    tokens packed as rows that share their prompt's cache row, up to `max_rows` tokens in all (fp32 weights:
    F32_KERNEL_ROWS, where torch's sgemm starts to be faster; int8 / int4: KERNEL_ROWS, as their matmuls). Longer
    prefills run the model's own modules (`Decoder.forward`)."""

    def __init__(self, dec: FastDecoder):
        self.layers = [layer.kernel_args() for layer in dec.w.layers]
        self.tier = kernels.chosen_tier()  # found once: it reads the environment and the CPU's flags
        self.max_rows = F32_KERNEL_ROWS if dec.w.layers[0].qkv_p.f32_tier is not None else KERNEL_ROWS

    @staticmethod
    def runs(model: Quark, weights: FusedWeights) -> bool:
        return (model.device.type == "cpu" and model.dtype == torch.float32 and kernels.available()
                and all(layer.kernel_args() is not None for layer in weights.layers))

    def prefill(self, dec: FastDecoder, idx: torch.Tensor, cache: KVCache, slots: int | torch.Tensor,  # shape: forward
                key_mask: torch.Tensor | None, n_keys: int | None, last: torch.Tensor | None = None) -> torch.Tensor:
        """`Decoder.forward`'s prefill: prompt j (row j of idx, its first last[j] + 1 tokens; right padding is not
        run) into cache row j at its slots; the logits (m, V) of each prompt's last token."""
        m, T = idx.shape
        lengths = torch.full((m,), T) if last is None else last + 1
        if int(lengths.sum()) > self.max_rows:
            return Decoder.forward(dec, idx, cache, slots, key_mask, n_keys, last)
        keep = torch.arange(T) < lengths[:, None]  # (m, T): the real tokens
        pos = torch.arange(slots, slots + T).expand(m, T) if isinstance(slots, int) else slots.expand(m, T)
        rows = torch.arange(m)[:, None].expand(m, T)[keep]
        pos = pos[keep].long()
        n = n_keys or int(pos.max()) + 1
        mask = None if key_mask is None else key_mask[rows].contiguous()
        x = dec.w.embed(idx[keep]).contiguous()  # (tokens, D), updated in place by every layer
        for args, k, v in zip(self.layers, cache.k, cache.v):
            kernels.decode_layer(x, args, (k, v), dec.w.tables, pos, key_mask=mask, n_keys=n, cache_rows=rows,
                                 tier=self.tier)
        return dec.w.lm_head(dec.w.norm(x[lengths.cumsum(0) - 1])).float()

    def decode(self, dec: FastDecoder, tok: torch.Tensor, slots: int | torch.Tensor, n_keys: int | None) -> torch.Tensor:
        B = tok.shape[0]
        cache, key_mask = dec.cache.rows(0, B), dec._mask(B)
        slots = torch.full((B,), slots) if isinstance(slots, int) else slots.reshape(B).long()
        n = n_keys or int(slots.max()) + 1
        x = dec.w.embed(tok).reshape(B, -1).contiguous()  # (B, D), updated in place by every layer
        for args, k, v in zip(self.layers, cache.k, cache.v):
            kernels.decode_layer(x, args, (k, v), dec.w.tables, slots, key_mask=key_mask, n_keys=n, tier=self.tier)
        return dec.w.lm_head(dec.w.norm(x)).float()


class GraphStep(EagerStep):
    """All B rows at their own slots over the whole cache (masked), static shapes, captured once as a CUDA graph
    (elsewhere the same static step runs eagerly: tested on CPU); prefill through torch.compile."""

    def __init__(self, dec: FastDecoder):
        self.use_compile = dec.device.type == "cuda" and os.environ.get("QUARK_COMPILE", "1") != "0"
        self.tok = torch.zeros(dec.B, 1, dtype=torch.long, device=dec.device)
        self.pos = torch.zeros(dec.B, 1, dtype=torch.long, device=dec.device)  # per-row slots
        self.graph: torch.cuda.CUDAGraph | bool | None = None  # None: not captured yet; False: runs eagerly
        self.compiled_forward = torch.compile(dec.forward, dynamic=True) if self.use_compile else None

    def prefill(self, dec: FastDecoder, *args) -> torch.Tensor:
        if self.compiled_forward is not None:
            try:
                return self.compiled_forward(*args)
            except Exception as e:  # noqa: BLE001 -- compile problems must not break generation
                warnings.warn(f"compiled prefill failed ({type(e).__name__}: {e}); using eager prefill", stacklevel=3)
                self.compiled_forward = None
        return dec.forward(*args)

    def static_step(self, dec: FastDecoder) -> torch.Tensor:
        return dec.forward(self.tok, dec.cache, self.pos, dec.key_mask, dec.max_len)

    def decode(self, dec: FastDecoder, tok: torch.Tensor, slots: int | torch.Tensor, n_keys: int | None) -> torch.Tensor:
        b = tok.shape[0]
        self.tok[:b].copy_(tok)
        if isinstance(slots, int):
            self.pos.fill_(slots)  # a host scalar written into device memory: no sync
        else:
            self.pos[:b].copy_(slots)
        if self.graph is None:
            self.graph = self._capture(dec) if dec.device.type == "cuda" else False
        if self.graph is False:
            return self.static_step(dec)[:b]
        self.graph.replay()
        return self.out[:b]

    def _capture(self, dec: FastDecoder) -> torch.cuda.CUDAGraph | bool:
        """Compile the static step (if asked) and capture it once as a CUDA graph; False (eager) on failure."""
        saved = [t.clone() for t in dec.cache.k + dec.cache.v]  # warm-up steps write a slot: restore it after
        try:
            step = lambda: self.static_step(dec)  # noqa: E731
            fn = torch.compile(step, fullgraph=True, dynamic=False) if self.use_compile else step
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = fn()
        except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager
            warnings.warn(f"CUDA-graph decode unavailable ({type(e).__name__}: {e}); decoding eagerly", stacklevel=3)
            graph = False
        for t, s in zip(dec.cache.k + dec.cache.v, saved):
            t.copy_(s)
        return graph


class FastDecoder(Decoder):
    """`Decoder` over fused weights, running its decode steps with `step` (one of the classes above)."""

    def __init__(self, model: Quark, batch_size: int, max_len: int, step: type[EagerStep] | None = None,
                 weights: FusedWeights | None = None):
        super().__init__(model, batch_size, max_len)
        self.w = weights or FusedWeights(model)
        step = step or (GraphStep if self.device.type == "cuda" else
                        KernelStep if KernelStep.runs(model, self.w) else EagerStep)
        self.how = step(self)
        self.threads = Threads() if self.device.type == "cpu" else None

    @property
    def busy(self) -> bool:
        return self._busy

    @busy.setter
    def busy(self, value: bool) -> None:
        self._busy = value
        if not value and getattr(self, "threads", None) is not None:  # a generation let go: torch's own count
            self.threads.release()

    def forward(self, idx: torch.Tensor, cache: KVCache, slots: int | torch.Tensor, key_mask: torch.Tensor | None,
                n_keys: int | None, last: torch.Tensor | None = None) -> torch.Tensor:
        ctx = Context.build(self.w.tables, idx.shape[1], cache=cache, slots=slots, key_mask=key_mask, n_keys=n_keys)
        x = self.w.embed(idx)
        for i, layer in enumerate(self.w.layers):
            x = layer_forward(layer, x, ctx, i)
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return self.w.lm_head(self.w.norm(x)).float()

    def prefill_forward(self, *args) -> torch.Tensor:
        if self.threads is None:
            return self.how.prefill(self, *args)
        return self.threads.run(lambda: self.how.prefill(self, *args))

    def decode(self, tok: torch.Tensor, slots: int | torch.Tensor, n_keys: int | None) -> torch.Tensor:
        if self.threads is None:
            return self.how.decode(self, tok, slots, n_keys)
        return self.threads.run(lambda: self.how.decode(self, tok, slots, n_keys))


_PLAIN_FORWARD, _PLAIN_HIDDEN = Quark.forward, Quark.hidden
_CUDA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(B, L, dtype): its captured decoder}


def supports_fast(model: nn.Module) -> bool:
    """The fast path handles the Quark architecture (float, int8 or int4 weights) unless QUARK_FAST=0. A model
    whose `forward` or `hidden` was overridden (a subclass or a patch) keeps the plain path, so the override is
    honoured."""
    return (os.environ.get("QUARK_FAST", "1") != "0" and isinstance(model, Quark)
            and type(model).forward is _PLAIN_FORWARD and type(model).hidden is _PLAIN_HIDDEN
            and isinstance(model.model.embed_tokens, (nn.Embedding, Int8Embedding)))


def _pow2(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def decoder_for(model: Quark, batch_size: int, max_len: int) -> FastDecoder | None:
    """A FastDecoder for `model` with room for `batch_size` rows and `max_len` slots, over fused copies of its
    current weights, or None for a model the fast path does not take. On CUDA the captured decoder of that bucket
    of shapes is reused (its copies refreshed) unless another generation is using it."""
    if not supports_fast(model):
        return None
    if model.device.type != "cuda":
        return FastDecoder(model, batch_size, max_len)
    B, L = _pow2(batch_size, 1), min(_pow2(max_len + 1, 256), model.config.context_length)
    decoders = _CUDA.setdefault(model, {})
    dec = decoders.get((B, L, model.dtype))
    if dec is not None and dec.busy:  # another generation is using the captured one: an eager one for this call
        return FastDecoder(model, batch_size, max_len, EagerStep)
    try:
        dec.w.refresh(model)
    except (AttributeError, LookupError, RuntimeError):  # none yet, or new modules or shapes: a new one
        dec = decoders[(B, L, model.dtype)] = FastDecoder(model, B, L)
    return dec


register_fast_decoder(decoder_for)
