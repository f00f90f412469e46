"""`quark prepare`: the command-line face of `quark.data.prepare` (argument parsing and a one-screen summary)."""

from __future__ import annotations

import argparse


def cmd_prepare(args: argparse.Namespace) -> None:
    from .mixture import load_mixture, mixture_from_dict
    from .prepare import prepare

    if args.sft is not None and args.sft:  # --sft FILE...: OpenAI-format JSONL conversations
        raw = {"kind": "sft", "sources": [{"name": "sft_files", "type": "files", "paths": args.sft, "chat": True,
                                           "license": args.license, "weight": 1.0}]}
        mixture = mixture_from_dict(raw, "--sft")
        mixture.name = "sft_files"
    elif args.mixture:
        mixture = load_mixture(args.mixture)
        if args.sft is not None and mixture.kind != "sft":
            raw = dict(mixture.raw, kind="sft")
            for s in raw["sources"]:
                if s.get("type") == "files":
                    s["chat"] = True
            mixture = mixture_from_dict(raw, args.mixture)
    else:
        raise ValueError("give --mixture (a TOML file or a packaged name) or --sft FILE.jsonl ...")
    import sys

    for line in mixture.dropped_lines():
        print(f"quark prepare: {line}", file=sys.stderr)
    tok = _load_tokenizer(args.tokenizer)
    if args.seq_len is None:
        context = _model_context(args.tokenizer)
        args.seq_len = min(context or 2048, 2048)
        if mixture.kind == "sft":
            why = (f"the context of the model in {args.tokenizer}" if context and context <= 2048 else
                   f"at most 2048 of the model's {context}; longer rows with --seq-len" if context else "the default")
            print(f"quark prepare: rows of --seq-len {args.seq_len} tokens ({why})", file=sys.stderr)
    m = prepare(mixture, tok, args.out, tokens=args.tokens, seed=args.seed, val_fraction=args.val_fraction,
                skip_bad=args.skip_bad, shard_tokens=args.shard_tokens, seq_len=args.seq_len,
                workers=args.workers, progress=not args.quiet, dedup=not args.no_dedup)
    print(f"{m['kind']} data in {args.out} ({m['seconds']:.1f}s)")
    for s in m["sources"]:
        extra = ", ".join(f"{k.replace('_', ' ')} {s[k]}" for k in ("empty_skipped", "bad_skipped", "eval_removed",
                                                                     "truncated", "too_long_skipped") if s[k])
        print(f"  {s['name']:22s} weight {s['weight']:<6g} {s['tokens']:>12,} tokens {s['documents']:>9,} docs "
              f"epochs {s['epochs']}" + (f" ({extra})" if extra else ""))
    for split, d in m["splits"].items():
        rows = f", {d['rows']:,} rows" if "rows" in d else ""
        print(f"  {split}: {len(d['shards'])} shard(s), {d['tokens']:,} tokens{rows}, {d['bytes']:,} bytes")
    print(f"  eval items removed by exact-text dedup: {m['eval_dedup_removed']}")


def _is_model(path: str) -> bool:
    from pathlib import Path

    p = Path(path)
    return (p.is_file() and p.suffix == ".gguf") or (p.is_dir() and ((p / "config.json").exists()
                                                                      or (p / "checkpoints").is_dir()))


def _load_tokenizer(path: str):
    """A model's own tokenizer (folder, run, checkpoint or .gguf: its chat template and special tokens), or a
    tokenizer folder / tokenizer.json."""
    from ..tokenizer import Tokenizer
    from ..weights import load_tokenizer_for

    return load_tokenizer_for(path) if _is_model(path) else Tokenizer.load(path)


def _model_context(path: str) -> int | None:
    """The context length of the model at `path` when the tokenizer given is a model (an export, an imported
    folder, a run, a checkpoint or a .gguf file), so SFT rows fit the model they will train."""
    from ..weights import config_for

    if not _is_model(path):
        return None
    try:
        return config_for(path).context_length
    except (OSError, ValueError, KeyError):
        return None


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a data mixture into .npy shards (pre-training or SFT)")
    p.add_argument("--mixture", help="mixture TOML file, or a packaged one: offline, quark-72m, sft, tokenizer")
    p.add_argument("--sft", nargs="*", metavar="JSONL",
                   help='SFT mode; with files: OpenAI-format JSONL ({"messages": [...]} per line)')
    p.add_argument("--tokenizer", required=True, help="the model to train (a model folder, run or .gguf file: its "
                   "own tokenizer and chat template), or a tokenizer folder / tokenizer.json")
    p.add_argument("--out", required=True, help="output data folder (manifest.json, train/, val/)")
    p.add_argument("--tokens", type=int, help="token budget (pre-training: required unless the mixture sets it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, help="share of documents for val (default 0.01; SFT 0.02)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records instead of stopping")
    p.add_argument("--seq-len", type=int, help="SFT row length (rows hold seq_len + 1 ids); default: the model's "
                   "context when --tokenizer is a model, at most 2048")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default 16M)")
    p.add_argument("--workers", type=int, help="processes for math generation (default: all cores)")
    p.add_argument("--license", default="user-provided", help="licence recorded for --sft files")
    p.add_argument("--no-dedup", action="store_true", help="do not remove evaluation items (not recommended)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
