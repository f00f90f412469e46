"""`quark speedrun`: the command-line face of quark/speedrun.py (stages) and quark/speedrun_report.py (report)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .speedrun import RECIPES, Recipe, Run, _fmt_s, _show, speedrun, stage_commands
from .speedrun_report import write_report


def _recipe_from_args(args) -> Recipe:
    r = RECIPES[args.preset]
    kw = {}
    if args.max_tokens is not None:
        kw["pretrain_tokens"] = int(args.max_tokens)
        # no more data than it can train on, but enough for a validation split worth the name
        kw["data_tokens"] = min(r.data_tokens, max(int(args.max_tokens), 2_000_000))
    if args.max_minutes is not None:
        kw["pretrain_minutes"] = args.max_minutes
    for f in ("vocab_size", "tokenizer_bytes", "mixture", "data_tokens", "sft_minutes", "sft_tokens", "eval_limit",
              "eval_tasks", "name", "arith_limit", "sft_pretrain_mix"):
        v = getattr(args, f, None)
        if v is not None:
            kw[f] = v
    if args.no_gguf:
        kw["gguf"] = False
    for k in ("pretrain_tokens", "data_tokens", "vocab_size", "tokenizer_bytes", "eval_limit", "sft_tokens"):
        if k in kw and kw[k] is not None and kw[k] <= 0:
            raise ValueError(f"--{k.replace('_', '-')}: must be a positive number, got {kw[k]}")
    if kw.get("arith_limit") is not None and kw["arith_limit"] < 0:
        raise ValueError(f"--arith-limit: must be >= 0 (0: no arith), got {kw['arith_limit']}")
    if kw.get("sft_pretrain_mix") is not None and not 0 <= kw["sft_pretrain_mix"] < 1:
        raise ValueError(f"--sft-pretrain-mix: must be in [0, 1), got {kw['sft_pretrain_mix']}")
    for k in ("pretrain_minutes", "sft_minutes"):
        if k in kw and kw[k] is not None and kw[k] <= 0:
            raise ValueError(f"{k}: must be a positive number of minutes, got {kw[k]}")
    return dataclasses.replace(r, **kw)


def cmd_speedrun(args) -> None:
    recipe = _recipe_from_args(args)
    if args.nproc < 1:
        raise ValueError(f"--nproc: must be >= 1, got {args.nproc}")
    run = Run(Path(args.out), recipe)
    if args.print_commands:
        for stage, cmds in stage_commands(run, args.nproc).items():
            for c in cmds:
                print(f"# {stage}\n{_show(c)}")
        return
    t0 = time.time()
    speedrun(args.out, recipe, nproc=args.nproc, write_report=write_report)
    print(f"\nspeedrun finished in {_fmt_s(time.time() - t0)} (this call). Next:\n"
          f"  quark chat --model {run.hf}\n"
          f"  quark serve --model {run.hf}      # then open http://127.0.0.1:8000\n"
          f"  less {run.report}")


def _float_int(s: str) -> int:
    return int(float(s))  # accepts 2e9


def add_commands(sub) -> None:
    p = sub.add_parser("speedrun", help="raw text to a served chat model: tokenizer, data, pretrain, SFT, eval, "
                       "export, report")
    p.add_argument("--preset", choices=sorted(RECIPES), default="tiny",
                   help="recipe: tiny (2 CPU cores, < 20 min, offline data) or quark-72m (the card's, GPUs)")
    p.add_argument("--out", required=True, help="run folder; rerunning resumes it, skipping finished stages")
    p.add_argument("--max-tokens", type=_float_int, help="bound pre-training (and prepared data) to N tokens")
    p.add_argument("--max-minutes", type=float, help="bound pre-training to N minutes")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for training, through torchrun")
    p.add_argument("--mixture", help="pre-training mixture: packaged name (offline, quark-72m) or a TOML path")
    p.add_argument("--vocab-size", type=int, help="override the recipe's base vocabulary")
    p.add_argument("--tokenizer-bytes", type=_float_int, help="override the tokenizer corpus budget")
    p.add_argument("--data-tokens", type=_float_int, help="override the pre-training tokens to prepare")
    p.add_argument("--sft-minutes", type=float, help="override the SFT time bound")
    p.add_argument("--sft-tokens", type=_float_int, help="bound SFT to N tokens")
    p.add_argument("--eval-limit", type=int, help="items per evaluation task")
    p.add_argument("--eval-tasks", help="comma-separated tasks (default piqa,arc_easy,hellaswag)")
    p.add_argument("--arith-limit", type=int, help="held-out arith questions per module x difficulty (0: skip arith)")
    p.add_argument("--sft-pretrain-mix", type=float, help="share of SFT rows that are pre-training windows")
    p.add_argument("--name", help="model name in the card and the export folder")
    p.add_argument("--no-gguf", action="store_true", help="skip the GGUF export")
    p.add_argument("--print-commands", action="store_true", help="print each stage's command and exit")
    p.set_defaults(func=cmd_speedrun)
