"""Training speed and memory of fine-tuning on CPU: Quark full SFT and LoRA vs HF LlamaForCausalLM (full) and
HF + PEFT LoRA, on the same model, batches, optimizer and step (`quark.train.loop.train_step`).

    python bench/finetune_speed.py --base /tmp/ft/smollm2            # an imported SmolLM2 folder (quark import)

Each mode runs in its own process (so peak RSS is its own) in the order given, three times by default, alternating,
because the machine is shared: compare the ratios of one run. Reported: training tokens/s (input tokens of the
timed steps over their wall time, the first step excluded), peak RSS (VmHWM) and the RSS added by training
(peak minus the RSS after loading the model: gradients, optimizer state, activations).
Both sides: fp32, AdamW (fused) over the trainable parameters, LoRA rank 16 / alpha 32 on all seven projections,
no dropout. HF's loss is the plain `F.cross_entropy` over its full logits (summed, as Quark's step expects).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = ("quark-full", "quark-lora", "hf-full", "hf-peft")


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(mode: str, base: str, rank: int):
    import torch

    if mode.startswith("quark"):
        from quark.lora import apply_lora
        from quark.train.loop import LossModule
        from quark.weights import load_model

        model = load_model(base).train()
        if mode == "quark-lora":
            apply_lora(model, rank, 2.0 * rank)
        return model, LossModule(model)
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).train()
    if mode == "hf-peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"]))

    class HFLoss(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, y, mask=None):
            logits = self.m(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")

    return model, HFLoss(model)


def worker(mode: str, base: str, steps: int, batch: int, seq: int, rank: int) -> dict:
    import torch

    from quark.train.loop import train_step
    from quark.train.optim import build_optimizer

    torch.manual_seed(0)
    model, step_model = build(mode, base, rank)
    loaded = rss_mb("VmRSS")
    opt = build_optimizer(model, 1e-5, weight_decay=0.0)
    vocab = 49152 if not hasattr(model, "config") else getattr(model.config, "vocab_size", 49152)
    g = torch.Generator().manual_seed(1)
    times, losses = [], []
    for _ in range(steps + 1):
        x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        t0 = time.perf_counter()
        loss, _ = train_step(step_model, model, opt, [(x[:, :-1], x[:, 1:], None)])
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"mode": mode, "tok_s": batch * seq * steps / sum(times[1:]), "step_s": sum(times[1:]) / steps,
            "peak_rss_mb": rss_mb("VmHWM"), "loaded_rss_mb": loaded, "train_rss_mb": rss_mb("VmHWM") - loaded,
            "trainable": trainable, "first_loss": losses[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="an HF Llama / imported Quark folder (both loaders read it)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode (after one untimed)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.base, args.steps, args.batch, args.seq, args.rank)))
        return
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            r = subprocess.run([sys.executable, __file__, "--worker", mode, "--base", args.base, "--steps",
                                str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--rank",
                                str(args.rank)], capture_output=True, text=True, env=dict(os.environ))
            if r.returncode:
                sys.exit(f"{mode} failed:\n{r.stderr[-2000:]}")
            results.setdefault(mode, []).append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[mode][-1]), flush=True)
    print(f"\nbatch {args.batch} x {args.seq} tokens, fp32, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| mode | trainable params | tok/s (best of rounds) | peak RSS MB | RSS added by training MB |")
    print("|---|---|---|---|---|")
    for mode, rs in results.items():
        best = max(rs, key=lambda r: r["tok_s"])
        print(f"| {mode} | {best['trainable'] / 1e6:.2f}M | {best['tok_s']:.2f} | {best['peak_rss_mb']:.0f} | "
              f"{best['train_rss_mb']:.0f} |")
    for ours, peer in (("quark-full", "hf-full"), ("quark-lora", "hf-peft")):
        if ours in results and peer in results:
            ratio = [a["tok_s"] / b["tok_s"] for a, b in zip(results[ours], results[peer])]
            print(f"{ours} / {peer} tok/s per round: {', '.join(f'{r:.2f}x' for r in ratio)}")


if __name__ == "__main__":
    main()
