"""`quark pretrain` and `quark sft`: thin front-ends over the one training loop (`quark.train.loop.train`).

Both take `--config` (a TOML file or a packaged name such as `pretrain-tiny`), `--data`, `--out`, and any number of
`--set key=value` overrides; `sft` adds `--from BASE` (any model Quark loads: a run, an export, an imported folder,
a .gguf file) and `--pretrain-data DIR`. `sft` without `--config` uses the packaged `sft` config (full fine-tuning
at lr 2e-5), or `sft-lora` (lr 2e-4) when `--set lora_rank=R` asks for LoRA: those files say why.
Launch several processes with torchrun (one machine, or several with --nnodes and a rendezvous endpoint):
    torchrun --nproc_per_node 8 -m quark pretrain --config pretrain-quark-72m --data data/pretrain --out runs/base
"""

from __future__ import annotations


def _run(args, kind: str) -> int:
    from .config import load_config
    from .loop import train

    fixed = {"kind": kind, "data": args.data, "out": args.out, "tokenizer": args.tokenizer}
    if kind == "sft":
        fixed["base"], fixed["pretrain_data"] = args.base, args.pretrain_data
    config = args.config
    if kind == "sft" and config is None:
        from .config import parse_override

        lora = [v for k, v in map(parse_override, args.set or []) if k == "lora_rank"]
        config = "sft-lora" if lora and lora[-1] else "sft"
    cfg = load_config(config, args.set or [], **fixed)
    if args.print_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    train(cfg)
    return 0


def cmd_pretrain(args) -> int:
    return _run(args, "pretrain")


def cmd_sft(args) -> int:
    return _run(args, "sft")


def _common(p) -> None:
    p.add_argument("--config", help="TOML train config: a path or a packaged name (see quark/configs/); sft default: "
                   "sft, or sft-lora with --set lora_rank=R")
    p.add_argument("--data", help="data folder written by `quark prepare` (overrides the config's data)")
    p.add_argument("--out", help="run folder; resumed from its newest checkpoint when it has one")
    p.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json the data was prepared with (default: the "
                   "data folder's own, else for sft the base checkpoint's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lr=1e-3 --set max_minutes=5 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_commands(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train a model from scratch on prepared shards (resumable; torchrun-ready)")
    _common(p)
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("sft", help="supervised fine-tuning of a base checkpoint on prepared chat rows")
    _common(p)
    p.add_argument("--from", dest="base", help="the model to fine-tune: a run, checkpoint, export, imported or HF "
                   "Llama folder, or a llama .gguf file")
    p.add_argument("--pretrain-data", help="the base's pre-training data folder: its validation loss is reported at "
                   "each evaluation (what SFT costs), and --set pretrain_mix=F mixes its windows into the batches")
    p.set_defaults(func=cmd_sft)
