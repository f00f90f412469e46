"""CPU matmul kernels for one decode token: the weights of quark-72m's 57 matrices, one activation row each.

    python bench/cpu_kernels.py               # one thread
    python bench/cpu_kernels.py --threads 2
    python bench/cpu_kernels.py --threads 2 --rows 8   # a decode batch of 8 (1 row: batch-1 decoding)

Decoding at batch 1 is a matrix-vector product per weight matrix, bound by how fast the weights stream from memory.
This prints, per kernel torch offers on the CPU, the time of one token's matmuls and the weight bytes read per
second, beside a memory-read reference (`sum` over the same fp32 bytes), so the gap of `quark/fast.py`'s and
`quark/quantize.py`'s choices to the machine's bandwidth (and to llama.cpp's whole-token time in
bench/llamacpp.py) is a measured figure. Different random matrices per call: no weight is reused from cache.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F


def shapes(n_layers: int = 14, d: int = 512, kv: int = 128, d_ff: int = 1344, vocab: int = 65538) -> list[tuple[int, int]]:
    """(out, in) of fast.py's fused matrices: qkv, o, gate_up, down per layer, then the lm_head."""
    return [(d + 2 * kv, d), (d, d), (2 * d_ff, d), (d, d_ff)] * n_layers + [(vocab, d)]


def time_token(fns: list, xs: list[torch.Tensor], rounds: int) -> float:
    for f, x in zip(fns, xs):
        f(x)
    t0 = time.perf_counter()
    for _ in range(rounds):
        for f, x in zip(fns, xs):
            f(x)
    return (time.perf_counter() - t0) / rounds


def kernels(ws: list[torch.Tensor], rows: int = 1) -> dict[str, tuple[list, int]]:
    """name -> (one callable per matrix, weight bytes read per token), built lazily so a missing op is skipped."""
    from quark import kernels as quark_kernels
    from quark.quantize import int8_pack_dynamic, pack_nibbles, quantize_int4_tensor, quantize_tensor

    out = {}
    ours = quark_kernels.available()  # quark's kernels (quark/kernels.py) where this CPU has AVX512-VNNI
    out["fp32 F.linear (out, in)"] = ([lambda x, w=w: F.linear(x, w) for w in ws], 4)
    if ours:
        out["fp32 quark f32_gemv [quark fp32]"] = ([lambda x, w=w: quark_kernels.f32_gemv(x, w) for w in ws], 4)
    wt = [w.t().contiguous() for w in ws]
    out["fp32 x @ W (in, out) MKL [QUARK_CPU_COMPILE=0]"] = ([lambda x, w=w: x @ w for w in wt], 4)
    del wt
    from quark.fast import DNNL_PACK_ROWS, dnnl_linear, dnnl_pack, matvec

    if rows == 1:
        for w in ws:
            torch._dynamo.maybe_mark_dynamic(w, 0)  # as quark/fast.py does: one kernel per input size
        out["fp32 inductor (x * W).sum(-1)" + ("" if ours else " [quark fp32]")] = (
            [lambda x, w=w: matvec(x, w) for w in ws], 4)
    if dnnl_linear(torch.zeros(2, 4), torch.zeros(3, 4)) is not None:
        out["fp32 oneDNN linear" + (" [quark fp32, prefill]" if rows > DNNL_PACK_ROWS else "")] = (
            [lambda x, w=w: dnnl_linear(x, w) for w in ws], 4)
        packed = [dnnl_pack(w) for w in ws]
        out["fp32 oneDNN linear, packed" + (" [quark fp32]" if 1 < rows <= DNNL_PACK_ROWS and not ours else "")] = (
            [lambda x, w=w: dnnl_linear(x, w) for w in packed], 4)
        del packed
    if hasattr(torch.ops.mkl, "_mkl_linear"):
        pk = [(torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w) for w in ws]
        out["fp32 MKL packed"] = ([lambda x, p=p: torch.ops.mkl._mkl_linear(x, p[0], p[1], None, rows)
                                   for p in pk], 4)
    bf = [w.bfloat16() for w in ws]
    out["bf16 F.linear"] = ([lambda x, w=w: F.linear(x.bfloat16(), w) for w in bf], 2)
    q8 = [quantize_tensor(w) for w in ws]
    if ours:
        out["int8 quark int8_gemv (VNNI) [quark int8]"] = (
            [lambda x, q=q: quark_kernels.int8_gemv(x, q[0], q[1]) for q in q8], 1 + 4 / 512)
    out["int8 _weight_int8pack_mm, bf16 act" + (" [quark int8]" if rows > 1 and not ours else "")] = (
        [lambda x, q=q: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q[0], q[1].bfloat16()) for q in q8], 1)
    dyn = [int8_pack_dynamic(q, s) for q, s in q8]
    if all(p is not None for p in dyn) and rows == 1:
        out["int8 fbgemm dynamic" + ("" if ours else " [quark int8, 1 row]")] = (
            [lambda x, p=p: torch.ops.quantized.linear_dynamic(x, p, True) for p in dyn], 1)
    q4 = [quantize_int4_tensor(w, 32) for w in ws[:-1]]  # the tied head stays int8, as quantize_int4 keeps it
    n_layer, n_head = sum(w.numel() for w in ws[:-1]), ws[-1].numel()
    int4_bytes = ((0.5 + 4 / 32) * n_layer + n_head) / (n_layer + n_head)  # nibbles, bf16 (scale, zero) / 32
    q, s = q8[-1]
    if ours:
        t4 = [(pack_nibbles(q4i), quark_kernels.int4_table(sz, 32)) for q4i, sz in q4]
        out["int4 quark int4_gemv (VNNI) + int8 head [quark int4]"] = (
            [lambda x, t=t: quark_kernels.int4_gemv(x, *t) for t in t4]
            + [lambda x: quark_kernels.int8_gemv(x, q, s)], int4_bytes)
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu") and (dyn[-1] is not None or rows > 1):
        p4 = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4i.to(torch.int32), 1), sz) for q4i, sz in q4]
        # the int8 head: fbgemm for one row, _weight_int8pack_mm for several (as quark/quantize.py without its kernels)
        head = (lambda x, p=dyn[-1]: torch.ops.quantized.linear_dynamic(x, p, True)) if rows == 1 else (
            lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s.bfloat16()))
        out["int4 _weight_int4pack_mm_for_cpu + int8 head" + ("" if ours else " [quark int4]")] = (
            [lambda x, p=p: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), p[0], 32, p[1]) for p in p4]
            + [head], int4_bytes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--rows", type=int, default=1, help="activation rows per matmul (a decode batch, a prefill)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    sh = shapes()
    ws = [torch.randn(o, i) * 0.02 for o, i in sh]
    n = sum(o * i for o, i in sh)
    xs = [torch.randn(args.rows, i) for _, i in sh]
    print(f"# {n / 1e6:.1f}M weights in {len(sh)} matrices, {args.rows} row(s), {args.threads} thread(s), "
          f"torch {torch.__version__}")
    ref = time_token([lambda x, w=w: w.sum() for w in ws], xs, args.rounds)
    print(f"{'memory read reference (fp32 sum)':46s} {ref * 1e3:7.2f} ms/token  {4 * n / ref / 1e9:5.1f} GB/s")
    for name, (fns, bytes_per_weight) in kernels(ws, args.rows).items():
        dt = time_token(fns, xs, args.rounds)
        print(f"{name:46s} {dt * 1e3:7.2f} ms/token  {bytes_per_weight * n / dt / 1e9:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
