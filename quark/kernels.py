"""Quark's C++ CPU kernels (quark/csrc/): int8 / int4 / fp32 weights times a few float rows, and `decode_layer`
(one decoder layer's decode step, `quark.model.layer_forward`'s math in C++), in three tiers built for the CPU
they run on.

Why: batch-1 decoding reads every weight once a token, so its speed is the matmuls' memory bandwidth, and a small
model's step spends as long between its matmuls (dozens of small torch ops a layer) as in them. One C++ call a
layer, over int8 dot products on activations quantized in blocks of 32 (llama.cpp q8_0's scheme), does both.

Choices:
- Tiers, each its own extension compiled with its own flags (as ggml-cpu builds one variant per architecture) and
  chosen at run time from the CPU's flags: `avx512` (AVX512-VNNI, -BW, -VL), `avx2` (AVX2 + FMA, plus AVX-VNNI's dot
  product where the CPU has it), `portable` (plain C++, no intrinsics: any CPU with a C++ compiler, ARM64 and Apple
  included, where it is built with -mcpu=native so the compiler may use NEON's int8 dot product). The portable
  tier is the reference: tests hold every tier this CPU runs to it and to `layer_forward`.
  QUARK_CPU_ISA=avx512|avx2|portable forces a tier, `torch` the eager torch path, `auto` (default) the best here.
- Built at first use with `torch.utils.cpp_extension.load` (g++ and ninja; one C++ file a tier, ~20-40 s once), then
  loaded from torch's extension cache (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions), a folder per tier, torch
  version, sources and flags; the ops are `torch.ops.quark_<tier>.{int8_gemv, int4_gemv, f32_gemv, decode_layer}`.
- torch's build lock (`lock`, a bare file) outlives a killed build, and torch waits on it forever. So a build first
  takes quark's own lock, an flock on `quark.lock` with the owner's pid written in it: the kernel drops it when the
  owner dies, so holding it means any `lock` there is orphaned (removed, one note); another process's live build is
  waited for at most BUILD_WAIT_S, then this process decodes with eager torch (one note).
- A built library in a folder this process may not write, or with no compiler (`$CXX` or c++) on PATH, is loaded as
  it is; with neither a library nor a compiler, one line says so and decoding uses eager torch; a failed build is
  one warning naming the compiler's first error.
- Threads: torch's own OpenMP pool (`at::parallel_for`), so `torch.set_num_threads` applies.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
TIERS = ("avx512", "avx2", "portable")  # fastest first
NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma"}, "avx2": {"avx2", "fma"},
         "portable": set()}  # CPU flags (Linux /proc/cpuinfo names) each tier runs on
TIER_FLAGS = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"], "avx2": ["-mavx2", "-mfma"],
              "portable": []}
BUILD_WAIT_S = 120.0  # the longest wait for another process's build before decoding with eager torch
_OPS: dict[str, object | None] = {}  # tier -> its torch.ops namespace, or None once it failed in this process


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere, which leaves the portable tier), read once:
    every kernel call asks for its tier, and reading /proc/cpuinfo takes longer than a layer's decode step."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((ln.split(":", 1)[1] for ln in lines if ln.split(":")[0].strip() in ("flags", "Features")),
                          "").split())


def supported_tiers() -> list[str]:
    """The tiers this CPU runs, fastest first (always ending with portable)."""
    flags = cpu_flags()
    return [t for t in TIERS if NEEDS[t] <= flags]


def chosen_tier() -> str | None:
    """The tier QUARK_CPU_ISA asks for (auto: the fastest this CPU runs), or None for eager torch."""
    v = os.environ.get("QUARK_CPU_ISA", "auto").strip().lower() or "auto"
    if v == "torch":
        return None
    if v != "auto" and v not in TIERS:
        raise ValueError(f"QUARK_CPU_ISA={v!r}: allowed values are auto, {', '.join(TIERS)}, torch")
    here = supported_tiers()
    if v != "auto" and v not in here:
        raise ValueError(f"QUARK_CPU_ISA={v}: this CPU lacks {', '.join(sorted(NEEDS[v] - cpu_flags()))}; "
                         f"allowed here: {', '.join(here)}, torch (or unset it)")
    return here[0] if v == "auto" else v


def compile_flags(tier: str) -> list[str]:
    extra = ["-mavxvnni"] if tier == "avx2" and "avx_vnni" in cpu_flags() else []
    if tier == "portable" and platform.machine().lower() in ("arm64", "aarch64"):
        extra = ["-mcpu=native"]  # NEON and, where the CPU has it, the int8 dot product
    # -fopenmp: `at::parallel_for` is OpenMP in torch's headers; the extension links the libgomp torch loaded
    return ["-O3", *TIER_FLAGS[tier], *extra] + (["-fopenmp"] if platform.system() == "Linux" else [])


def build_directory(tier: str) -> Path:
    """One folder per tier, torch version, copy of the sources (their path and content) and flags: two checkouts
    or versions of quark on one machine would otherwise rebuild over each other at every process start."""
    from torch.utils import cpp_extension

    files = [CSRC / f"{tier}.cpp", CSRC / "layer.h"]
    digest = hashlib.sha256(b"".join(str(f).encode() + f.read_bytes() for f in files)
                            + " ".join(compile_flags(tier)).encode()).hexdigest()[:12]
    tag = f"quark_{tier}-torch{torch.__version__.split('+')[0]}-{digest}"
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / tag


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


def _load(tier: str) -> object | None:
    """Build (or load) `tier`'s extension; its torch.ops namespace, or None (noted or warned once)."""
    name = f"quark_{tier}"
    try:
        from torch.utils import cpp_extension

        folder = build_directory(tier)
        library = folder / f"{name}.so"
        compiler = os.environ.get("CXX") or "c++"
        has_compiler = shutil.which(compiler) is not None
        writable = os.access(_existing_parent(folder), os.W_OK)
        if library.is_file() and not (writable and has_compiler):  # built already: nothing to write or compile
            torch.ops.load_library(str(library))
            return getattr(torch.ops, name)
        if not has_compiler:
            _note(f"{compiler} not found on PATH (install g++, or set CXX to a C++ compiler, to build quark's CPU "
                  "kernels); using torch's kernels")
            return None
        if not writable:
            _note(f"{folder} is not writable, so quark's CPU kernels cannot be built there (set TORCH_EXTENSIONS_DIR "
                  "to a folder you may write to); using torch's kernels")
            return None
        folder.mkdir(parents=True, exist_ok=True)
        with build_lock(folder, BUILD_WAIT_S) as held:
            if not held:
                return None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # cpp_extension's notes on compiler versions
                cpp_extension.load(name=name, sources=[str(CSRC / f"{tier}.cpp")], extra_cflags=compile_flags(tier),
                                   extra_ldflags=["-fopenmp"] if "-fopenmp" in compile_flags(tier) else [],
                                   build_directory=str(folder), is_python_module=False)
        return getattr(torch.ops, name)
    except Exception as e:  # noqa: BLE001 -- a failed build: eager torch still works
        lines = str(e).splitlines() or [""]
        first_error = next((line for line in lines if ": error" in line), None) or lines[0]  # the compiler's
        warnings.warn(f"quark's {tier} CPU kernels could not be built ({type(e).__name__}: {first_error[:400]}); "
                      "decoding with eager torch (slower; QUARK_CPU_ISA=torch skips the attempt)", stacklevel=3)
        return None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def ops(tier: str | None = None) -> object | None:
    """`tier`'s ops (default: the chosen tier), built or loaded the first time; None where they do not run."""
    tier = tier or chosen_tier()
    if tier is None:
        return None
    if tier not in _OPS:
        _OPS[tier] = _load(tier)
    return _OPS[tier]


def available() -> bool:
    """Whether decoding runs quark's kernels here (the chosen tier built or loaded)."""
    return ops() is not None


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, tier: str | None = None) -> torch.Tensor:
    """x (M, K) float @ (weight int8 (N, K) * scale fp32 (N,)[:, None]).T -> (M, N) float32, x's rows quantized
    in blocks of 32. Requires `available()` (or a built `tier`)."""
    return ops(tier).int8_gemv(x, weight, scale)


def int4_table(sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """quantize.py's int4 scales_and_zeros (K/group, N, 2) bf16 -> the kernels' (N, K/32, 2): each row's
    (scale, zero) pairs in order, one per 32 columns (a group of 64..256 repeats its pair)."""
    return sz.transpose(0, 1).repeat_interleave(group_size // 32, dim=1).contiguous()


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor, tier: str | None = None) -> torch.Tensor:
    """x (M, K) float @ dequant(qweight).T -> (M, N) float32; qweight (N, K/2) plain nibbles, `table` from
    `int4_table`."""
    return ops(tier).int4_gemv(x, qweight, table)


F32_BLOCK = 32  # rows of W a block of `f32_pack`'s layout holds (quark/csrc/layer.h)


def f32_pack(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W (N, K) float32 -> the same values in `f32_gemv`'s layout (quark/csrc/layer.h), an (N, K) tensor (`out`, if
    given): blocks of F32_BLOCK rows one after another, each stored column by column (the last block narrower)."""
    N, K = w.shape
    full = N // F32_BLOCK * F32_BLOCK
    out = torch.empty(N, K, dtype=torch.float32) if out is None else out
    flat = out.view(-1)
    blocks = N // F32_BLOCK
    flat[:full * K].view(blocks, K, F32_BLOCK).copy_(w[:full].reshape(blocks, F32_BLOCK, K).transpose(1, 2))
    flat[full * K:].view(K, N - full).copy_(w[full:].T)
    return out


def f32_gemv(x: torch.Tensor, packed: torch.Tensor, tier: str | None = None) -> torch.Tensor:
    """x (M, K) float @ W.T -> (M, N) float32, W (N, K) float32 given as `f32_pack(W)` (read once for all rows)."""
    return ops(tier).f32_gemv(x, packed)


def decode_layer(x: torch.Tensor, layer: tuple, kv: tuple[torch.Tensor, torch.Tensor],
                 tables: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, *, key_mask: torch.Tensor | None,
                 n_keys: int, cache_rows: torch.Tensor | None = None, tier: str | None = None) -> None:
    """One decoder layer (`quark.model.layer_forward`) for one new token of each row of x (B, D) float32, in place.
    `layer` (ln1, ln2, eps, qkv, o, gate_up, down), each matrix [`f32_pack`ed fp32 weight], [int8 weight, fp32
    scale] or [int4 nibbles, `int4_table`]; the new keys and values are written into `kv` (B, n_kv, L, hd) each at
    `slots` (B,), or with `cache_rows` (B,) int64 into kv's row cache_rows[b] (kv (C, n_kv, L, hd)): rows sharing
    a cache row are one prompt's tokens, a prefill. Attention over the first `n_keys` slots under
    `quark.model.attention_mask`'s rule with `key_mask` (B, >= n_keys) bool or None; `tables` the RoPE cos/sin
    (positions, hd)."""
    ops(tier).decode_layer(x, *layer, *kv, *tables, slots, key_mask, n_keys, cache_rows)
