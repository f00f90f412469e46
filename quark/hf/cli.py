"""`quark import`: a Llama-family checkpoint from elsewhere as a Quark folder. `quark export`: a checkpoint (model folder or run folder) as an HF remote-code folder, a Llama folder or a
GGUF file. Heavy imports happen inside the command."""

from __future__ import annotations

import argparse
import json


def cmd_export(args: argparse.Namespace) -> None:
    if args.format != "gguf" and (args.quant or args.gguf_amx_safe):
        raise ValueError(f"--quant and --gguf-amx-safe apply to --format gguf, not --format {args.format}")
    if args.format == "peft":
        from .peft_export import export_peft

        out = export_peft(args.checkpoint, args.out, overwrite=args.force, base_model=args.base_model)
    elif args.format == "gguf":
        from .gguf_export import export_gguf

        out = export_gguf(args.checkpoint, args.out, dtype=args.gguf_dtype, overwrite=args.force, name=args.name,
                          quant=args.quant, amx_safe=args.gguf_amx_safe)
    else:
        from .export import export

        out = export(args.checkpoint, args.out, fmt=args.format, overwrite=args.force, run=args.run,
                     eval_results=args.eval_results, name=args.name, repo_id=args.repo_id,
                     base_model=args.base_model)
    print(f"wrote {out} ({args.format})")


def cmd_import(args: argparse.Namespace) -> None:
    from .importer import import_model

    out = import_model(args.src, args.out, overwrite=args.force)
    cfg = json.loads((out / "config.json").read_text())["quark"]
    print(f"wrote {out}: {cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['n_heads']}/{cfg['n_kv_heads']} "
          f"heads, vocab {cfg['vocab_size']:,}, context {cfg['context_length']:,}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a Llama-family checkpoint (HF LlamaForCausalLM folder or llama "
                                      ".gguf file) as a Quark model folder")
    p.add_argument("src", help="an HF folder (config.json + safetensors + tokenizer files) or a .gguf file")
    p.add_argument("--out", required=True, help="the Quark model folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face folder (remote code), a Llama folder "
                                      "or a GGUF file, with a generated model card")
    p.add_argument("--checkpoint", required=True, help="model folder, checkpoint folder or run folder (newest step)")
    p.add_argument("--out", required=True, help="output folder (hf, llama) or .gguf file (gguf)")
    p.add_argument("--format", choices=("hf", "llama", "gguf", "peft"), default="hf",
                   help="hf: config.json + auto_map + modeling_quark.py (default); llama: plain LlamaForCausalLM "
                        "folder, no remote code; gguf: one llama.cpp file (a LoRA run's adapters are merged into "
                        "all three); peft: a LoRA run's adapters as a PEFT adapter folder")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output")
    p.add_argument("--run", help="run folder whose run.json/metrics.jsonl fill the card (default: found from the "
                                 "checkpoint's path)")
    p.add_argument("--eval-results", help="quark eval JSON for the card (default: <model folder>/eval_results.json)")
    p.add_argument("--name", help="model name shown in the card / GGUF metadata (default: the output's name)")
    p.add_argument("--repo-id", help="Hub repository id used in the card's Quickstart (default: the name)")
    p.add_argument("--base-model", help="the Hub model id (org/name) of the base model, for an SFT model's card "
                   "(base_model in its front matter); left out when not given. --format peft: the transformers "
                   "base the adapters load onto (default: the base the run recorded)")
    p.add_argument("--gguf-dtype", choices=("f32", "f16"), default="f32",
                   help="GGUF weight type for the matrices (norms stay f32); default f32")
    p.add_argument("--quant", choices=("q8_0", "q4_0"), help="gguf: quantize the matrices (gguf package quantizers)")
    p.add_argument("--gguf-amx-safe", action="store_true",
                   help="gguf --quant: write matrices whose row length is not a multiple of 256 as bf16, out of "
                        "reach of llama.cpp's AMX repack (see README, CPU speed)")
    p.set_defaults(func=cmd_export)
