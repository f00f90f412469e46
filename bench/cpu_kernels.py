"""CPU matmuls of one decode token: quark-72m's 57 fused matrices, each tier of quark's kernels beside eager torch.

    PYTHONPATH=. python bench/cpu_kernels.py                      # one thread, one row (batch-1 decoding)
    PYTHONPATH=. python bench/cpu_kernels.py --threads 2 --rows 8 # a decode batch of 8

Decoding at batch 1 is a matrix-vector product per weight matrix, bound by how fast the weights stream from memory.
This prints, per tier this CPU runs (quark/kernels.py) and per precision, the time of one token's matmuls and the
weight bytes read per second, beside eager torch's way to the same product (F.linear; int8/int4: dequantize then
F.linear, quark/quantize.py's fallback) and a memory-read reference (`sum` over the same fp32 bytes). Different
random matrices per call: no weight is reused from cache. Rounds alternate the kernels, best of `--rounds`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from quark import kernels
from quark.quantize import int4_dequantize, pack_nibbles, quantize_int4_tensor, quantize_tensor, unpack_nibbles


def shapes(n_layers: int = 14, d: int = 512, kv: int = 128, d_ff: int = 1344, vocab: int = 65538) -> list[tuple[int, int]]:
    """(out, in) of fast.py's fused matrices: qkv, o, gate_up, down per layer, then the lm_head."""
    return [(d + 2 * kv, d), (d, d), (2 * d_ff, d), (d, d_ff)] * n_layers + [(vocab, d)]


def time_token(fns: list, xs: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for f, x in zip(fns, xs):
        f(x)
    return time.perf_counter() - t0


def candidates(ws: list[torch.Tensor], tiers: list[str]) -> dict[str, tuple[list, int]]:
    """name -> (one callable per matrix, weight bytes read per token)."""
    q8 = [quantize_tensor(w) for w in ws]
    q4 = []
    for w in ws:
        q, sz = quantize_int4_tensor(w, 32)
        q4.append((pack_nibbles(q), sz, kernels.int4_table(sz, 32)))
    out = {
        "read fp32 (reference)": ([lambda x, w=w: w.sum() for w in ws], sum(w.numel() * 4 for w in ws)),
        "torch fp32 F.linear": ([lambda x, w=w: F.linear(x, w) for w in ws], sum(w.numel() * 4 for w in ws)),
        "torch int8 dequantize": ([lambda x, q=q, s=s: F.linear(x, q.float() * s[:, None]) for q, s in q8],
                                  sum(q.numel() for q, _ in q8)),
        "torch int4 dequantize": ([lambda x, t=t: F.linear(x, int4_dequantize(t[0], t[1])) for t in q4],
                                  sum(t[0].numel() + t[2].numel() * 2 for t in q4)),
    }
    bf = [(q, s.bfloat16()) for q, s in q8]
    out["torch int8 _weight_int8pack_mm"] = (
        [lambda x, q=q, s=s: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s) for q, s in bf],
        sum(q.numel() for q, _ in q8))
    int4pack = []  # torch's int4 kernel takes N % 16 == 0 only: the lm_head (int8 in quark's int4 models) int8
    for t, (q, s) in zip(q4, bf):
        if t[0].shape[0] % 16:
            int4pack.append(lambda x, q=q, s=s: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s))
            continue
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(t[0]).to(torch.int32), 1)
        int4pack.append(lambda x, p=p, sz=t[1]: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), p, 32, sz))
    out["torch int4 _weight_int4pack_mm_for_cpu"] = (int4pack, sum(t[0].numel() + t[2].numel() * 2 for t in q4))
    packed = [kernels.f32_pack(w) for w in ws]
    for tier in tiers:
        out[f"{tier} fp32"] = ([lambda x, w=w, t=tier: kernels.f32_gemv(x, w, tier=t) for w in packed],
                               sum(w.numel() * 4 for w in ws))
        out[f"{tier} int8"] = ([lambda x, q=q, s=s, t=tier: kernels.int8_gemv(x, q, s, tier=t) for q, s in q8],
                               sum(q.numel() for q, _ in q8))
        out[f"{tier} int4"] = ([lambda x, a=a, t=tier: kernels.int4_gemv(x, a[0], a[2], tier=t) for a in q4],
                               sum(a[0].numel() + a[2].numel() * 2 for a in q4))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tiers", default=",".join(kernels.supported_tiers()), help="tiers to run (default: all here)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tiers = [t for t in args.tiers.split(",") if t and kernels.ops(t) is not None]
    ws = [torch.randn(n, k) * 0.02 for n, k in shapes()]
    xs = [torch.randn(args.rows, k) for _, k in shapes()]
    cands = candidates(ws, tiers)
    best = {name: float("inf") for name in cands}
    for _ in range(args.rounds):
        for name, (fns, _) in cands.items():
            best[name] = min(best[name], time_token(fns, xs))
    print(f"# quark-72m token matmuls, {args.rows} row(s), {args.threads} thread(s), best of {args.rounds}; "
          f"tiers here: {', '.join(kernels.supported_tiers())}")
    print("| kernel | ms / token | weight GB/s |\n|---|---|---|")
    for name, (_, nbytes) in cands.items():
        print(f"| {name} | {best[name] * 1e3:.2f} | {nbytes / best[name] / 1e9:.1f} |")


if __name__ == "__main__":
    main()
