"""Greedy decode speed of one set of weights through every export path, on the CPU, in one process.

    OMP_NUM_THREADS=1 python bench/export_generate.py                 # tiny preset, 32-token prompt, 128 new tokens
    OMP_NUM_THREADS=1 python bench/export_generate.py --new-tokens 256 --threads 2

Random `tiny`-preset weights (4 layers, d_model 256, vocabulary 8,192 + 2) with a tokenizer trained on the stdlib
are exported with `quark export` as an HF remote-code folder, a Llama folder and a GGUF file, then decoded greedily
(batch 1, fp32) through: quark's own `generate_text`; the HF folder's `generate_text()` (the card's method) and
its transformers `generate()` (GenerationMixin + DynamicCache); the peer `LlamaForCausalLM.generate()` on the Llama
folder; and llama.cpp (llama-cpp-python, f32 KV cache) on the GGUF when installed. Each path's tokens are
compared with quark's (they must be identical) and its best-of-3 tokens/s is printed with its ratio to the peer
(transformers' own Llama).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sysconfig
import tempfile
import time


def best_of(fn, reps: int) -> tuple[float, list[int]]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args(argv)
    import torch
    import transformers

    from quark import Quark
    from quark.config import PRESETS
    from quark.generate import generate_text
    from quark.hf.export import export
    from quark.hf.gguf_export import export_gguf
    from quark.tokenizer import train_tokenizer
    from quark.weights import save_model

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    cfg = PRESETS[args.preset]
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:200]]
    tok = train_tokenizer(texts, vocab_size=(cfg.vocab_size - 2), show_progress=False)
    model = Quark(cfg.replace(init_std=0.1)).init_weights(seed=0).eval()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="quark-bench-"))
    save_model(model, tmp / "ck")
    tok.save(tmp / "ck")
    hf_dir = export(tmp / "ck", tmp / "hf")
    llama_dir = export(tmp / "ck", tmp / "llama", fmt="llama")
    gguf_file = export_gguf(tmp / "ck", tmp / "m.gguf")

    prompt = torch.tensor([tok.encode("\n".join(texts))[:args.prompt_tokens]])
    T, N = prompt.shape[1], args.new_tokens
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    llama = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    hf_kw = {"attention_mask": torch.ones_like(prompt), "do_sample": False, "max_new_tokens": N,
             "min_new_tokens": N, "repetition_penalty": 1.0, "eos_token_id": None, "pad_token_id": 0}

    paths = {
        "quark generate_text": lambda: generate_text(model, prompt, N, temperature=0.0)[0, T:].tolist(),
        "HF folder generate_text()": lambda: hf.generate_text(prompt, N, temperature=0.0)[0, T:].tolist(),
        "HF folder generate()": lambda: hf.generate(prompt, **hf_kw)[0, T:].tolist(),
        "peer: LlamaForCausalLM.generate()": lambda: llama.generate(prompt, **hf_kw)[0, T:].tolist(),
    }
    try:
        import llama_cpp
        import numpy as np

        llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=T + N, n_batch=T, n_threads=args.threads,
                              logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                              type_v=llama_cpp.GGML_TYPE_F32)

        def run_llama_cpp():
            llm.reset()
            llm.eval(prompt[0].tolist())
            out = []
            for _ in range(N):
                out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([out[-1]])
            return out

        paths["peer: llama.cpp (GGUF f32)"] = run_llama_cpp
    except ImportError:
        print("llama-cpp-python not installed: skipping the llama.cpp row")

    print(f"preset {args.preset}: {cfg.n_params():,} parameters; batch 1, prompt {T} tokens, {N} new tokens, "
          f"fp32, {args.threads} thread(s), best of {args.reps}")
    results = {}
    with torch.no_grad():
        for name, fn in paths.items():
            results[name] = best_of(fn, args.reps)
    ref_tokens = results["quark generate_text"][1]
    peer = N / results["peer: LlamaForCausalLM.generate()"][0]
    for name, (secs, toks) in results.items():
        same = "same tokens" if toks == ref_tokens else "DIFFERENT tokens"
        print(f"  {name:36s} {N / secs:9.1f} tok/s   x{(N / secs) / peer:5.2f} vs transformers' Llama   {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
