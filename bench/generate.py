"""CPU generation benchmark: Quark's decoder vs HF `LlamaForCausalLM.generate` on the same random weights.

Measures, in one run and on the same machine state:
- decode: batch 1, greedy, `--new-tokens` (256) after a short prompt; tok/s = new tokens / wall time of the call
  (prefill of the short prompt included, as a user sees it). Ours fast (the default path), ours plain
  (`fast=False`, the reference model.forward + KVCache loop), ours int8 (quark.quantize), HF fp32.
- prefill: one `--prefill-len` (512) token prompt, next-token logits only (what `generate` needs), ours vs
  HF `model(ids, logits_to_keep=1)`; tok/s = prompt tokens / time.
Each figure is the best of `--repeats` runs (all runs are printed); the load average is printed because the
CPU may be shared. Greedy tokens of ours and HF are compared (same weights: they should agree).

    PYTHONPATH=. python bench/generate.py                  # quark-72m, fp32 + int8, a machine of its own
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python bench/generate.py   # cores shared with other work
The OpenMP wait policy matters about 2x at batch 1 on 2 cores: spinning threads pick up each small matmul at
once on an idle machine (libgomp's default), sleeping ones (PASSIVE) are woken per op but do not crawl when
other processes hold the cores. Both contenders run under the same policy; the header prints it. Our decode
steps pick their thread count at run time (quark/cpu_settings.py); QUARK_THREADS=N pins it. Quark vs llama.cpp on
the same weights: bench/llamacpp.py.
Quick check: `PYTHONPATH=. python bench/generate.py --preset tiny --new-tokens 64`.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import torch

from quark import Quark
from quark.config import QuarkConfig
from quark.fast import decoder_for
from quark.generate import generate
from quark.quantize import quantize_int4, quantize_int8


def llama_twin(model: Quark):
    """HF LlamaForCausalLM with the same config and weights (Llama parameter names: a plain state-dict copy)."""
    import transformers

    c = model.config
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.context_length, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    return hf.to(model.dtype)


def _best(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quark-72m")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best round counts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--quantize", choices=["int8", "int4", "both", "none"], default="int8",
                    help="also benchmark int8 (default), int4 or both")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype of ours and HF's")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF peer")
    ap.add_argument("--no-plain", action="store_true", help="skip our plain reference path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = QuarkConfig.from_name(args.preset)
    model = Quark(cfg).init_weights(seed=0).eval().to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]))
    n, P = args.new_tokens, args.prefill_len
    if args.prompt_len + n > cfg.context_length or P + 1 > cfg.context_length:
        raise SystemExit(f"prompt/prefill lengths exceed context_length={cfg.context_length}")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, (cfg.vocab_size - 2), (1, args.prompt_len), generator=g)
    long_prompt = torch.randint(1, (cfg.vocab_size - 2), (1, P), generator=g)
    print(f"# bench/generate.py  preset={args.preset} ({cfg.n_params() / 1e6:.1f}M params) {args.dtype}, batch 1, "
          f"{n} new tokens greedy, prompt {args.prompt_len}; prefill {P}")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
          f", load average before: {os.getloadavg()[0]:.2f}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: libgomp spins, then sleeps)')}")

    # name -> {"decode"|"prefill": [(wall_s, cpu_s), ...]}; each round runs every contender once (interleaved),
    # so a burst of load from other processes hits all of them, and the best round of each is reported.
    runs: dict[str, dict[str, list]] = {}
    tokens: dict[str, list[int]] = {}
    contenders = [(f"ours {args.dtype}", model, True)]
    if not args.no_plain:
        contenders.append((f"ours {args.dtype} plain path", model, False))
    if args.quantize in ("int8", "both"):
        contenders.append(("ours int8", quantize_int8(copy.deepcopy(model)), True))
    if args.quantize in ("int4", "both"):
        contenders.append(("ours int4", quantize_int4(copy.deepcopy(model)), True))
    hf = None if args.no_hf else llama_twin(model)
    hf_kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0,
             "attention_mask": torch.ones_like(prompt)}

    def timed(name, kind, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        runs.setdefault(name, {}).setdefault(kind, []).append((time.perf_counter() - w0, time.process_time() - c0))
        return out

    def prefill(m):
        decoder_for(m, 1, P + 1).prefill(long_prompt)

    with torch.no_grad():
        for _name, m, fast in contenders:  # warm-up: allocations, weight fusing
            generate(m, prompt, max_new_tokens=8, temperature=0.0, fast=fast)
            if fast:
                prefill(m)
        if hf is not None:
            hf.generate(prompt, **{**hf_kw, "max_new_tokens": 8, "min_new_tokens": 8})
            hf(long_prompt, logits_to_keep=1)
        for _ in range(args.repeats):
            for name, m, fast in contenders:
                out = timed(name, "decode", lambda m=m, fast=fast: generate(m, prompt, max_new_tokens=n,
                                                                            temperature=0.0, fast=fast))
                tokens[name] = out[0]
                if fast:
                    timed(name, "prefill", lambda m=m: prefill(m))
            if hf is not None:
                out = timed("HF LlamaForCausalLM", "decode", lambda: hf.generate(prompt, **hf_kw))
                tokens["HF"] = out[0, prompt.shape[1]:].tolist()
                timed("HF LlamaForCausalLM", "prefill", lambda: hf(long_prompt, logits_to_keep=1))

    def rates(kind, v):
        k = n if kind == "decode" else P
        wall = [k / w for w, _ in v]
        return max(wall), wall, max(k / c for _, c in v)

    rows = {name: {kind: rates(kind, v) for kind, v in r.items()} for name, r in runs.items()}
    hf_row = rows.get("HF LlamaForCausalLM")
    print(f"\n{'':22s} {'decode tok/s':>12s} {'vs HF':>6s} {'prefill tok/s':>13s} {'vs HF':>6s}  "
          f"{'per CPU-s: decode':>17s} {'prefill':>8s}   wall tok/s of every round: decode | prefill")
    for name, r in rows.items():
        d, p = r["decode"], r.get("prefill")
        rd = f"{d[0] / hf_row['decode'][0]:.2f}x" if hf_row else "-"
        rp = f"{p[0] / hf_row['prefill'][0]:.2f}x" if hf_row and p else "-"
        every = " ".join(f"{x:.1f}" for x in d[1]) + " | " + (" ".join(f"{x:.0f}" for x in p[1]) if p else "-")
        pf, pc = (f"{p[0]:13.1f}", f"{p[2]:8.1f}") if p else (f"{'-':>13s}", f"{'-':>8s}")
        print(f"{name:22s} {d[0]:12.1f} {rd:>6s} {pf} {rp:>6s}  {d[2]:17.1f} {pc}   {every}")
    ref = tokens.get("HF", tokens.get(f"ours {args.dtype} plain path"))
    if ref is not None:
        for name, t in tokens.items():
            if t is ref:
                continue
            same = next((i for i, (a, b) in enumerate(zip(t, ref)) if a != b), None)
            what = "all equal" if same is None else f"first difference at token {same}"
            print(f"greedy tokens {name} vs {'HF' if 'HF' in tokens else 'plain'}: {what}")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
