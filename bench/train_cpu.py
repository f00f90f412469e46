"""CPU training throughput, ours vs HF `LlamaForCausalLM`, same shapes, same run (fp32).

The model is the `tiny` preset (4 layers, d_model 256, vocab 8192+2, context 256) unless --preset says otherwise.
Ours: `quark.train.loop.train_step` (the loop's own step: chunked fused cross-entropy, AdamW, clipping).
Peer: HF Llama with the same config (SDPA attention, tied embeddings), `labels=` loss, the same AdamW groups.
Steps are timed in alternating rounds (ours, HF, ours, ...) so both see the same machine load; the median
round is reported.

    OMP_NUM_THREADS=2 python bench/train_cpu.py            # target: ours >= 1.2x HF
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quark.config import QuarkConfig
from quark.model import Quark
from quark.train.loop import LossModule, train_step
from quark.train.optim import build_optimizer


def hf_twin(cfg: QuarkConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.context_length,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                     attention_bias=False, mlp_bias=False)
    hc._attn_implementation = "sdpa"
    return LlamaForCausalLM(hc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = QuarkConfig.from_name(args.preset)
    B, T = args.batch, cfg.context_length
    data = torch.randint(0, cfg.vocab_size, (args.rounds * args.steps + 2, B, T + 1))

    ours = Quark(cfg).init_weights(0).train()
    ours_step = LossModule(ours)
    ours_opt = build_optimizer(ours, 1e-3, weight_decay=0.1)
    hf = hf_twin(cfg).train()
    hf_opt = build_optimizer(hf, 1e-3, weight_decay=0.1)

    def run_ours(i):
        w = data[i]
        return train_step(ours_step, ours, ours_opt, [(w[:, :-1], w[:, 1:], None)], grad_clip=1.0)

    def run_hf(i):
        w = data[i]
        loss = hf(input_ids=w[:, :-1], labels=w[:, :-1]).loss  # HF shifts labels inside: T-1 targets per row
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return float(loss), float(gnorm)

    run_ours(0), run_hf(0)  # warm-up
    t_ours, t_hf = [], []
    for r in range(args.rounds):
        for fn, acc in ((run_ours, t_ours), (run_hf, t_hf)):
            t = time.perf_counter()
            for s in range(args.steps):
                fn(1 + r * args.steps + s)
            acc.append((time.perf_counter() - t) / args.steps)
    tokens = B * T
    ours_tps, hf_tps = tokens / statistics.median(t_ours), tokens / statistics.median(t_hf)
    print(f"preset {args.preset}: {ours.n_params() / 1e6:.2f}M params, batch {B} x {T} tokens, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"ours (Quark, quark.train.loop.train_step): {ours_tps:,.0f} tok/s")
    print(f"peer (HF LlamaForCausalLM, sdpa):          {hf_tps:,.0f} tok/s")
    print(f"ratio ours / HF: {ours_tps / hf_tps:.2f}x (target >= 1.2x)")


if __name__ == "__main__":
    main()
