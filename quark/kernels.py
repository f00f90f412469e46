"""Quark's hand-written CPU kernels: int8 and int4 weights times a few float rows (`quark::int8_gemv`,
`quark::int4_gemv`, quark/csrc), the matmuls of decode steps and short prefills (1..256 rows a call).

Why it exists: batch-1 decoding reads every weight once a token, so its speed is the int8 matmul's memory
bandwidth. torch has no one-row int8 kernel that a compiled graph can call at that speed: inductor's fused
dequantize-and-reduce keeps one accumulator chain a row (~10 GB/s on one AMD EPYC core), fbgemm's dynamic linear
takes a ScriptObject dynamo cannot trace, oneDNN's int8 linear needs frozen weights and costs ~20 us a call. This
kernel quantizes each activation row in blocks of 32 (llama.cpp q8_0's scheme) and multiplies with AVX512-VNNI
int8 dot products, prefetching the weights: 16-18 GB/s on one core, 23-30 on two where a plain read of memory runs
at 21-23 and 27-37 (dev/LOG.md 2026-12-03, fourth session).
The int4 kernel does the same over quark's int4 layout (plain nibbles, a (scale, zero) pair per 32 columns), where
torch's int4 kernel (bf16 activations) is the alternative.
`quark::decode_layer` (quark/csrc/decode_layer.cpp) runs a whole decoder layer (fp32, int8 or int4 weights; fp32
through `quark::f32_gemv`) for one token of each row around those matmuls: quark/fast.py's CPU decode step, one call
a layer instead of a compiled graph whose Python wrapper, guards and ~60 small kernels cost as much as the matmuls.

Choices:
- Built at first use with `torch.utils.cpp_extension.load` (g++ and ninja; ~15 s once, then loaded from torch's
  extension cache, TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, a folder per torch version and sources),
  registered as torch operators: `torch.ops.quark.int8_gemv` and `.int4_gemv` with fake (shape-only) implementations,
  so `torch.compile` graphs call them as extern kernels; `.f32_gemv` and `.decode_layer`, called eagerly. torch's
  build lock is a file that a killed build leaves behind, and every later build would wait on it forever: a lock
  older than STALE_LOCK_S is removed.
- Only on CPUs that report avx512_vnni, avx512bw and avx512vl; elsewhere, when the build fails (warned once) or
  with QUARK_CPU_KERNELS=0, `available()` is False and quark/quantize.py runs torch's kernels instead.
- Threads: torch's own OpenMP pool (`at::parallel_for`), so `torch.set_num_threads` and the thread tuner apply.
- Accuracy: per-32 activation blocks keep the relative error of a product near 0.5% (fbgemm's per-tensor 7-bit
  activations: ~1.4%); tests compare it with the float product of the dequantized weights.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / f
           for f in ("int8_gemv.cpp", "int4_gemv.cpp", "f32_gemv.cpp", "decode_layer.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / "gemv.h"]
# -fopenmp: `at::parallel_for` is OpenMP in torch's headers; the extension links the libgomp torch already loaded
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-fopenmp"]
_LOADED: list[bool] = []  # [whether the torch.ops.quark kernels are usable], once decided in this process
STALE_LOCK_S = 600  # a build takes ~10 s; a lock this old was left by a killed one


def build_directory() -> Path:
    """One folder per torch version and per copy of the sources (their path and content): two checkouts or
    versions of quark on one machine would otherwise rebuild over each other at every process start."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(b"".join(str(f).encode() + f.read_bytes() for f in SOURCES + HEADERS)).hexdigest()[:12]
    tag = f"quark_cpu_kernels-torch{torch.__version__.split('+')[0]}-{digest}"
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / tag


def clear_stale_lock(folder: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove torch's build lock in `folder` if it is older than `max_age_s`; True if one was removed."""
    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
            return True
    except FileNotFoundError:
        pass
    return False


def cpu_has_vnni() -> bool:
    """Whether this CPU reports AVX512-VNNI, -BW and -VL (Linux /proc/cpuinfo)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return {"avx512_vnni", "avx512bw", "avx512vl"} <= set(flags.split())


def _fake(x: torch.Tensor, w: torch.Tensor, _scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


def _load() -> bool:
    if os.environ.get("QUARK_CPU_KERNELS", "1") == "0" or not cpu_has_vnni():
        return False
    try:
        from torch.utils import cpp_extension

        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        if clear_stale_lock(folder):
            warnings.warn(f"removed a stale build lock in {folder} (a build was killed)", stacklevel=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cpp_extension's notes on compiler versions
            cpp_extension.load(name="quark_cpu_kernels", sources=[str(f) for f in SOURCES], extra_cflags=FLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False)
        for op in ("quark::int8_gemv", "quark::int4_gemv"):
            torch.library.register_fake(op)(_fake)
        return True
    except Exception as e:  # noqa: BLE001 -- no compiler or ninja: torch's kernels still work
        msg = str(e)
        first_error = next((line for line in msg.splitlines() if "error" in line.lower()), msg)  # the compiler's
        warnings.warn(f"quark's CPU kernels could not be built ({type(e).__name__}: {first_error[:400]}); int8/int4 "
                      "decoding uses torch's kernels (slower; set QUARK_CPU_KERNELS=0 to skip the attempt)",
                      stacklevel=3)
        return False


def available() -> bool:
    """Whether the `torch.ops.quark` kernels run here; builds or loads them the first time (call it eagerly, before
    compiling a graph that uses them)."""
    if not _LOADED:
        _LOADED.append(_load())
    return _LOADED[0]


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float @ (weight int8 (N, K) * scale fp32 (N,)[:, None]).T -> (M, N) float32, x's rows quantized
    in blocks of 32. Requires `available()`."""
    return torch.ops.quark.int8_gemv(x, weight, scale)


def int4_table(sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """quantize.py's int4 scales_and_zeros (K/group, N, 2) bf16 -> the kernel's (N, K/32, 2): each row's
    (scale, zero) pairs in order, one per 32 columns (a group of 64..256 repeats its pair)."""
    return sz.transpose(0, 1).repeat_interleave(group_size // 32, dim=1).contiguous()


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (M, K) float @ dequant(qweight).T -> (M, N) float32; qweight (N, K/2) plain nibbles, `table` from
    `int4_table`. Requires `available()`."""
    return torch.ops.quark.int4_gemv(x, qweight, table)


def decode_layer(x: torch.Tensor, layer: tuple, kv: tuple[torch.Tensor, torch.Tensor],
                 tables: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, *, key_mask: torch.Tensor | None,
                 n_keys: int) -> None:
    """One decoder layer (`quark.model.layer_forward`) for one new token of each row of x (B, D) float32, in place.
    `layer` (ln1, ln2, eps, qkv, o, gate_up, down), each matrix [fp32 weight], [int8 weight, fp32 scale] or [int4
    nibbles, `int4_table`]; the new keys and values are written into `kv` (B, n_kv, L, hd) each at `slots` (B,);
    attention over the first `n_keys` slots under `quark.model.attention_mask`'s rule with `key_mask`
    (B, >= n_keys) bool or None; `tables` the RoPE cos/sin (positions, hd). Requires `available()`."""
    torch.ops.quark.decode_layer(x, *layer, *kv, *tables, slots, key_mask, n_keys)


def f32_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) float @ weight float32 (N, K).T -> (M, N) float32 (reads the weight once for all rows). Requires
    `available()`."""
    return torch.ops.quark.f32_gemv(x, weight)
