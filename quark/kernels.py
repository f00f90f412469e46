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
  so `torch.compile` graphs call them as extern kernels; `.f32_gemv` and `.decode_layer`, called eagerly.
- torch's build lock (`lock`, a bare file) outlives a killed build, and torch waits on it forever. So a build first
  takes quark's own lock, an flock on `quark.lock` with the owner's pid written in it: the kernel drops it when the
  owner dies, so holding it means any `lock` there is orphaned (removed, one note); another process's live build is
  waited for at most BUILD_WAIT_S, then this process uses torch's kernels (one note).
- A built library in a folder this process may not write, or with no compiler (`$CXX` or c++) on PATH, is loaded as
  it is; with neither a library nor a compiler, one line says so ("c++ not found") instead of torch's banners.
- Only on CPUs that report avx512_vnni, avx512bw and avx512vl; elsewhere, when the build fails (warned once) or
  with QUARK_CPU_KERNELS=0, `available()` is False and quark/quantize.py runs torch's kernels instead.
- Threads: torch's own OpenMP pool (`at::parallel_for`), so `torch.set_num_threads` and the thread tuner apply.
- Accuracy: per-32 activation blocks keep the relative error of a product near 0.5% (fbgemm's per-tensor 7-bit
  activations: ~1.4%); tests compare it with the float product of the dequantized weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / f
           for f in ("int8_gemv.cpp", "int4_gemv.cpp", "f32_gemv.cpp", "decode_layer.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / "gemv.h"]
# -fopenmp: `at::parallel_for` is OpenMP in torch's headers; the extension links the libgomp torch already loaded
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-fopenmp"]
_LOADED: list[bool] = []  # [whether the torch.ops.quark kernels are usable], once decided in this process
BUILD_WAIT_S = 120.0  # the longest wait for another process's build (~15-60 s) before using torch's kernels
LIBRARY = "quark_cpu_kernels"


def build_directory() -> Path:
    """One folder per torch version and per copy of the sources (their path and content): two checkouts or
    versions of quark on one machine would otherwise rebuild over each other at every process start."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(b"".join(str(f).encode() + f.read_bytes() for f in SOURCES + HEADERS)).hexdigest()[:12]
    tag = f"quark_cpu_kernels-torch{torch.__version__.split('+')[0]}-{digest}"
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / tag


def cpu_has_vnni() -> bool:
    """Whether this CPU reports AVX512-VNNI, -BW and -VL (Linux /proc/cpuinfo)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return {"avx512_vnni", "avx512bw", "avx512vl"} <= set(flags.split())


def _fake(x: torch.Tensor, w: torch.Tensor, _scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


def _note(message: str) -> None:
    print(f"quark: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def build_lock(folder: Path, wait_s: float) -> Iterator[bool]:
    """Hold `folder`'s build lock (an flock on quark.lock, the holder's pid written in it) while torch builds there;
    yields True, or False after `wait_s` seconds of another live process holding it (one note names its pid). Held,
    any torch `lock` in `folder` belongs to a build that died, and is removed."""
    import fcntl

    path = folder / "quark.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = path.read_text().strip() or "?"
                    _note(f"waited {wait_s:g} s for the build of quark's CPU kernels by pid {owner} ({path}); using "
                          "torch's kernels in this process")
                    yield False
                    return
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        orphan = folder / "lock"
        if orphan.exists():
            orphan.unlink(missing_ok=True)
            _note(f"removed {orphan}, left by a build of quark's CPU kernels that was killed")
        yield True
    finally:
        os.close(fd)  # drops the flock


def _register_fakes() -> bool:
    for op in ("quark::int8_gemv", "quark::int4_gemv"):
        torch.library.register_fake(op)(_fake)
    return True


def _load() -> bool:
    if os.environ.get("QUARK_CPU_KERNELS", "1") == "0" or not cpu_has_vnni():
        return False
    try:
        from torch.utils import cpp_extension

        folder = build_directory()
        library = folder / f"{LIBRARY}.so"
        compiler = os.environ.get("CXX") or "c++"
        has_compiler = shutil.which(compiler) is not None
        writable = os.access(_existing_parent(folder), os.W_OK)
        if library.is_file() and not (writable and has_compiler):  # built already: nothing to write or compile
            torch.ops.load_library(str(library))
            return _register_fakes()
        if not has_compiler:
            _note(f"{compiler} not found on PATH (install g++, or set CXX to a C++ compiler, to build quark's CPU "
                  "kernels); using torch's kernels")
            return False
        if not writable:
            _note(f"{folder} is not writable, so quark's CPU kernels cannot be built there (set TORCH_EXTENSIONS_DIR "
                  "to a folder you may write to); using torch's kernels")
            return False
        folder.mkdir(parents=True, exist_ok=True)
        with build_lock(folder, BUILD_WAIT_S) as held:
            if not held:
                return False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # cpp_extension's notes on compiler versions
                cpp_extension.load(name=LIBRARY, sources=[str(f) for f in SOURCES], extra_cflags=FLAGS,
                                   extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False)
        return _register_fakes()
    except Exception as e:  # noqa: BLE001 -- a failed build: torch's kernels still work
        lines = str(e).splitlines() or [""]
        first_error = next((line for line in lines if ": error" in line), None) or lines[0]  # the compiler's
        warnings.warn(f"quark's CPU kernels could not be built ({type(e).__name__}: {first_error[:400]}); int8/int4 "
                      "decoding uses torch's kernels (slower; set QUARK_CPU_KERNELS=0 to skip the attempt)",
                      stacklevel=3)
        return False


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


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
