"""Agreement of a fine-tuned run's exports with independent loaders, on the real model: the Llama export in
transformers' LlamaForCausalLM, the GGUF export (f32) in llama.cpp (llama-cpp-python, where installed), and (a LoRA
run) the PEFT export through peft.PeftModel on the transformers base, each against Quark's own logits of the run
(adapters merged) on a chat prompt. Prints the max |logit difference| of each.

    python bench/finetune_agreement.py --run /tmp/quark-bench-finetune/lora --hf-base /tmp/quark-bench-finetune/smollm2
    PYTHONPATH=/tmp/lcp-avx2 python bench/finetune_agreement.py ...   # a llama_cpp package built in its own folder
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a quark sft run folder (full or LoRA)")
    ap.add_argument("--hf-base", help="the transformers base folder the PEFT adapters load onto (LoRA runs)")
    args = ap.parse_args()
    import transformers

    from quark.hf.export import export
    from quark.hf.peft_export import export_peft
    from quark.weights import LORA_JSON, load_model_and_tokenizer, resolve_model_path

    transformers.logging.set_verbosity_error()
    model, tok = load_model_and_tokenizer(args.run)
    ids = torch.tensor([tok.render_prompt([{"role": "user", "content": "Could you tell me who you are?"}])])
    with torch.no_grad():
        ours = model(ids)[0]
    with tempfile.TemporaryDirectory() as tmp:
        export(args.run, Path(tmp) / "llama", fmt="llama")
        hf = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "llama", torch_dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (hf(ids).logits[0] - ours).abs().max().item()
        print(f"llama export in transformers vs quark: max |logit diff| {diff:.2e} over {ids.shape[1]} tokens")
        try:
            import llama_cpp
        except ImportError:
            print("gguf export in llama.cpp: skipped (pip install llama-cpp-python)")
        else:
            import numpy as np

            from quark.hf.gguf_export import export_gguf

            export_gguf(args.run, Path(tmp) / "m.gguf")
            llm = llama_cpp.Llama(model_path=str(Path(tmp) / "m.gguf"), n_ctx=256, n_batch=256, logits_all=True,
                                  verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
            llm.eval(ids[0].tolist())
            theirs = torch.from_numpy(np.array(llm.scores[:ids.shape[1]])[:, :ours.shape[1]])
            print(f"gguf export (f32) in llama.cpp {llama_cpp.__version__} vs quark: max |logit diff| "
                  f"{(theirs - ours).abs().max().item():.2e}, greedy next tokens equal at "
                  f"{int((theirs.argmax(-1) == ours.argmax(-1)).sum())} of {ids.shape[1]} positions")
        if (resolve_model_path(args.run) / LORA_JSON).exists():
            import peft

            export_peft(args.run, Path(tmp) / "peft", base_model=args.hf_base)
            base = transformers.LlamaForCausalLM.from_pretrained(args.hf_base, torch_dtype=torch.float32)
            pm = peft.PeftModel.from_pretrained(base, str(Path(tmp) / "peft")).eval()
            with torch.no_grad():
                diff = (pm(ids).logits[0] - ours).abs().max().item()
            print(f"peft adapters on the transformers base vs quark (merged): max |logit diff| {diff:.2e}")


if __name__ == "__main__":
    main()
