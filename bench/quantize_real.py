"""What int8 / int4 cost a real model, beside llama.cpp's q8_0 / q4_0 of the same weights, on text its training
never saw.

    python bench/quantize_real.py --model MODEL_FOLDER [--text FILE ...] [--window 512] [--max-tokens 16384]

MODEL_FOLDER is a Quark model folder (e.g. `quark import SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2`: fp32 =
the dequantized Q4_1). The text defaults to this repository's own README.md, ARCHITECTURE.md and dev/LOG.md,
written in December 2026, after every published model's training data. It is tokenized once with the model's
tokenizer and cut into non-overlapping windows; every tool scores the same windows (mean next-token loss over
every position after the first). Ours: fp32, `quantize_int8`, `quantize_int4` (group 32) with a batched forward,
and int8 / int4 teacher-forced one token at a time through the decoder (the kernels a chat runs). llama.cpp
(llama-cpp-python, where installed): GGUF exports of the same weights (`quark export --format gguf`, f32 and
--quant q8_0 / q4_0), the same windows evaluated with logits for every position. Prints the perplexity, its
ratio to the tool's own fp32 and the greedy top-1 agreement with fp32, as a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def windows(ids: list[int], window: int, max_tokens: int) -> list[list[int]]:
    n = min(len(ids), max_tokens) // window
    return [ids[i * window:(i + 1) * window] for i in range(n)]


@torch.no_grad()
def ours(model, wins: list[list[int]], decode: bool = False) -> tuple[float, np.ndarray]:
    """(mean loss, top-1 ids) over the windows; `decode`: one token at a time through the decoder."""
    from quark.generate import make_decoder

    total, n, tops = 0.0, 0, []
    for w in wins:
        x = torch.tensor([w])
        if decode:
            dec = make_decoder(model, 1, len(w))
            rows = [dec.prefill(x[:, :1])]
            rows += [dec.step(x[:, t]) for t in range(1, len(w) - 1)]
            logits = torch.cat(rows).float()
        else:
            logits = model(x)[0, :-1].float()
        y = x[0, 1:]
        total += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
        tops.append(logits.argmax(-1).numpy())
    return total / n, np.concatenate(tops)


def llama_cpp_scores(gguf: Path, wins: list[list[int]], threads: int) -> tuple[float, np.ndarray]:
    from llama_cpp import Llama

    L = Llama(str(gguf), n_ctx=len(wins[0]), n_batch=len(wins[0]), logits_all=True, n_threads=threads,
              n_threads_batch=threads, verbose=False)
    total, n, tops = 0.0, 0, []
    for w in wins:
        L.reset()
        L.eval(w)
        logits = torch.from_numpy(np.array(L.scores[:len(w) - 1], dtype=np.float32))
        y = torch.tensor(w[1:])
        total += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
        tops.append(logits.argmax(-1).numpy())
    return total / n, np.concatenate(tops)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Quark model folder")
    ap.add_argument("--text", nargs="*", default=[str(ROOT / n) for n in ("README.md", "ARCHITECTURE.md", "dev/LOG.md")])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--decode-tokens", type=int, default=2048, help="tokens scored one at a time (0: skip)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args(argv)

    from quark.quantize import quantize_int4, quantize_int8
    from quark.weights import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    text = "\n\n".join(Path(p).read_text(encoding="utf-8") for p in args.text)
    wins = windows(tok.encode(text), args.window, args.max_tokens)
    n_tok = sum(len(w) - 1 for w in wins)
    print(f"# {args.model}: {len(wins)} windows x {args.window} tokens ({n_tok:,} scored) of "
          f"{', '.join(Path(p).name for p in args.text)}; torch threads {args.threads}", flush=True)
    torch.set_num_threads(args.threads)
    rows = {}
    t = time.perf_counter()
    base_loss, base_top = ours(model, wins)
    rows["quark fp32"] = (base_loss, base_loss, base_top, base_top, time.perf_counter() - t)
    quantized = {"int8": quantize_int8(copy.deepcopy(model)), "int4": quantize_int4(copy.deepcopy(model))}
    for name, q in quantized.items():
        t = time.perf_counter()
        loss, top = ours(q, wins)
        rows[f"quark {name}"] = (loss, base_loss, top, base_top, time.perf_counter() - t)
    if args.decode_tokens:
        dw = wins[:max(1, args.decode_tokens // args.window)]
        fl, ft = ours(model, dw, decode=True)
        for name, q in quantized.items():
            t = time.perf_counter()
            loss, top = ours(q, dw, decode=True)
            rows[f"quark {name}, decoded token by token"] = (loss, fl, top, ft, time.perf_counter() - t)
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("# llama.cpp rows skipped: pip install llama-cpp-python")
        else:
            from quark.hf.gguf_export import export_gguf

            with tempfile.TemporaryDirectory() as tmp:
                ref = None
                for quant in (None, "q8_0", "q4_0"):
                    g = export_gguf(args.model, Path(tmp) / f"{quant or 'f32'}.gguf", quant=quant, overwrite=True)
                    t = time.perf_counter()
                    loss, top = llama_cpp_scores(g, wins, args.threads)
                    ref = ref or (loss, top)
                    rows[f"llama.cpp {quant or 'f32'}"] = (loss, ref[0], top, ref[1], time.perf_counter() - t)
    print("\n| weights | perplexity | ratio to its fp32 | top-1 agreement with its fp32 | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, (loss, ref_loss, top, ref_top, secs) in rows.items():
        print(f"| {name} | {math.exp(loss):.3f} | {math.exp(loss - ref_loss):.4f} | "
              f"{(top == ref_top).mean():.4f} | {secs:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
