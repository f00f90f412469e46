"""`quark quantize`: quantize a model folder to int8 (`--bits 8`) or int4 (`--bits 4`) and report what it costs
and gains.

Prints JSON: fp32 and quantized sizes, greedy decode tok/s of both (this machine, batch 1) and, with `--data`, the
validation loss of both on the first `--eval-tokens` tokens of a pre-training data folder's val split, with
`ppl_ratio` = quantized perplexity / fp32 perplexity (tests/test_quantize.py holds int8 below 1.02 and int4 below
1.03), and the same over `--decode-eval-tokens` tokens decoded one at a time (`decode_ppl_ratio`): batch-1 decoding
runs other kernels than a batched forward (quark's int8/int4 kernels, which also quantize the activation
rows), and it is what `quark chat` runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

from .model import Quark


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from .generate import generate
    from .quantize import model_nbytes, quantize_int4, quantize_int8
    from .weights import load_model

    model = load_model(args.model, device="cpu", dtype=torch.float32).eval()
    bits = getattr(args, "bits", 8)
    kind = f"int{bits}"
    q = copy.deepcopy(model)
    q = quantize_int8(q) if bits == 8 else quantize_int4(q, getattr(args, "group_size", 32))
    report = {"model": str(args.model), "fp32_bytes": model_nbytes(model), f"{kind}_bytes": model_nbytes(q)}
    prompt = [[1 + i % 200 for i in range(16)]]
    n = min(args.tokens, model.config.context_length - 16)
    for name, m in (("fp32", model), (kind, q)):
        generate(m, prompt, max_new_tokens=4, temperature=0.0)
        t0 = time.perf_counter()
        generate(m, prompt, max_new_tokens=n, temperature=0.0)
        report[f"{name}_decode_tok_per_s"] = round(n / (time.perf_counter() - t0), 1)
    if args.data:
        for name, m in (("fp32", model), (kind, q)):
            report[f"{name}_val_loss"] = round(val_loss(m, args.data, args.eval_tokens), 5)
        report["ppl_ratio"] = round(math.exp(report[f"{kind}_val_loss"] - report["fp32_val_loss"]), 5)
        if args.decode_eval_tokens > 0:
            for name, m in (("fp32", model), (kind, q)):
                report[f"{name}_decode_val_loss"] = round(decode_loss(m, args.data, args.decode_eval_tokens), 5)
            report["decode_ppl_ratio"] = round(
                math.exp(report[f"{kind}_decode_val_loss"] - report["fp32_decode_val_loss"]), 5)
    print(json.dumps(report, indent=2))


def val_loss(model: Quark, data_folder: str | Path, max_tokens: int = 65536, seq_len: int | None = None) -> float:
    """Mean next-token loss over the first windows (about `max_tokens` tokens) of a pre-training data folder's val
    split: `quark eval --perplexity`'s computation (quark.eval.harness.perplexity), in windows of `seq_len` tokens
    (default the model's context, at most 512)."""
    import math

    from .eval.harness import perplexity

    T = seq_len or min(model.config.context_length, 512)
    return perplexity(model, data_folder, batch_size=4, max_windows=max(1, math.ceil(max_tokens / T)),
                      seq_len=T)["val_loss"]


def decode_loss(model: Quark, data_folder: str | Path, max_tokens: int = 2048, seq_len: int = 256) -> float:
    """Mean next-token loss over the first val windows (about `max_tokens` tokens) when every position is decoded
    one token at a time through the KV cache (teacher-forced, batch 1): the kernels a chat runs."""
    import torch
    import torch.nn.functional as F

    from .data.loader import PretrainLoader
    from .generate import make_decoder

    T = min(seq_len, model.config.context_length)
    loader = PretrainLoader(data_folder, "val", T, 1, vocab_size=model.config.vocab_size)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y, _ in loader.val_batches(max(1, math.ceil(max_tokens / T))):
            dec = make_decoder(model, 1, T)
            logits = dec.prefill(x[:, :1])
            for t in range(T):
                total += F.cross_entropy(logits, y[:, t]).item()
                n += 1
                if t + 1 < T:
                    logits = dec.step(x[:, t + 1])
    return total / max(n, 1)


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .quantize import INT4_GROUP_SIZES

    p = sub.add_parser("quantize", help="int8 / int4 weight-only quantization: size, decode speed, val loss vs fp32")
    p.add_argument("--model", required=True, help="model folder, export or run folder")
    p.add_argument("--data", default=None, help="pre-training data folder: compare validation loss fp32 vs int8")
    p.add_argument("--tokens", type=int, default=128, help="new tokens for the decode-speed check")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens for the loss comparison")
    p.add_argument("--decode-eval-tokens", type=int, default=2048,
                   help="validation tokens scored by batch-1 decoding (the chat kernels); 0 skips")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8, help="8: int8 per channel; 4: int4 group-wise")
    p.add_argument("--group-size", type=int, choices=INT4_GROUP_SIZES, default=32, help="int4 group size")
    p.set_defaults(func=cmd_quantize)
