"""`quark eval`: benchmark accuracy (PIQA, ARC, HellaSwag, ...; generative gsm8k, humaneval, arith) and validation
perplexity of a model folder.

Choices:
- The model folder's tokenizer is loaded and checked before any weights or items, so a folder without one fails
  at once; unknown task names and missing data fail before the model loads.
- Results go to `<model folder>/eval_results.json` (the eval-results contract; `quark export` reads it for the
  model card) unless `--output` says otherwise, plus a Markdown table beside it (`.md`), both written atomically.
- Generative tasks use the chat template when the checkpoint's run (run.json / train_state.json) was SFT, plain
  prompts otherwise (`--chat` overrides); arith drops questions found in the training data folders that run
  recorded (`--arith-dedup` overrides).
- `--device auto` runs on CUDA in bf16 when present, else on the CPU in fp32.
- `--limit`, `--batch-size` and `--perplexity-windows` must be >= 1, checked first (0 divided by zero, -1 dropped an
  item).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path


def parse_tasks(text: str) -> list[str]:
    """'piqa,arc_easy,gsm8k' -> validated task names (multiple-choice or generative), in order, without duplicates."""
    from .generative import GEN_TASKS
    from .tasks import TASKS

    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    known = ", ".join([*TASKS, *GEN_TASKS])
    if not names:
        raise ValueError(f"--tasks is empty; known tasks: {known}")
    for n in names:
        if n not in TASKS and n not in GEN_TASKS:
            raise ValueError(f"unknown task {n!r}; known tasks: {known}")
    return names


def cmd_eval(args: argparse.Namespace) -> None:
    from ..io import atomic_write_text
    from ..weights import load_for_inference, resolve_model_path
    from .generative import GEN_TASKS, build_gen_items
    from .harness import evaluate, markdown_table, perplexity
    from .tasks import build_items

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--perplexity-windows", args.perplexity_windows)):
        if value is not None and value < 1:  # arith's items are not built before the model loads
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    tasks = parse_tasks(args.tasks) if args.tasks else []
    if not tasks and not args.perplexity:
        raise ValueError("nothing to evaluate: give --tasks and/or --perplexity")
    for t in tasks:  # unknown names, missing data and bad --limit/--fewshot fail before the model loads
        if t in GEN_TASKS:
            if t != "arith":  # arith's items are generated (seconds) once, with the training data known
                build_gen_items(t, args.limit, args.fewshot, args.seed)
        else:
            build_items(t, args.limit, args.fewshot, args.seed)
    for d in args.arith_dedup or []:
        from ..data.loader import read_manifest

        read_manifest(d)
    if args.perplexity:  # so does a missing or non-pretraining data folder
        from ..data.loader import read_manifest

        kind = read_manifest(args.perplexity)["kind"]
        if kind != "pretrain":
            raise ValueError(f"{args.perplexity}: perplexity needs a pre-training data folder (kind 'pretrain'), "
                             f"found kind {kind!r}")
    folder = resolve_model_path(args.model)
    model, tok = load_for_inference(folder, args.device)
    folder = folder.parent if folder.is_file() else folder
    from .arith import run_record, training_data_dirs

    chat = run_record(folder).get("kind") == "sft" if args.chat == "auto" else args.chat == "yes"
    dedup = args.arith_dedup if args.arith_dedup is not None else training_data_dirs(folder)
    out = {"model": str(folder), "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "limit": args.limit, "fewshot": args.fewshot, "seed": args.seed, "tasks": {}}
    if tasks:
        out["tasks"] = evaluate(model, tok, tasks, limit=args.limit, fewshot=args.fewshot, seed=args.seed,
                                batch_size=args.batch_size, progress=not args.no_progress, chat=chat,
                                arith_dedup=dedup)
    if args.perplexity:
        out["perplexity"] = perplexity(model, args.perplexity, batch_size=max(1, args.batch_size // 4),
                                       max_windows=args.perplexity_windows)
    table = markdown_table(out)
    print(table, end="")
    path = Path(args.output) if args.output else folder / "eval_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    atomic_write_text(path.with_suffix(".md"), f"# Evaluation of {folder}\n\n{table}")
    print(f"wrote {path} and {path.with_suffix('.md')}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .generative import GEN_TASKS
    from .tasks import DEFAULT_TASKS, TASKS

    p = sub.add_parser("eval", help="score a model on PIQA/ARC/HellaSwag/... (lm-eval style), gsm8k/humaneval/"
                                    "arith (generative) and validation perplexity, offline")
    p.add_argument("--model", required=True, help="model folder, checkpoint, export, or run folder (newest step)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated tasks (default {','.join(DEFAULT_TASKS)}; known: "
                        f"{', '.join([*TASKS, *GEN_TASKS])}); "
                        "'' with --perplexity for perplexity only")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--fewshot", type=int, default=0, help="solved examples before each item (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (default 1234, as lm-eval)")
    p.add_argument("--batch-size", type=int, default=32, help="requests (choices) per forward pass (default 32)")
    p.add_argument("--perplexity", metavar="DATA_DIR",
                   help="also report validation loss and bits-per-byte on a `quark prepare` pre-training folder")
    p.add_argument("--perplexity-windows", type=int,
                   help="evaluate only the first N context windows of the val split (default: all)")
    p.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                   help="generative tasks through the chat template (auto: when the checkpoint's run was SFT)")
    p.add_argument("--arith-dedup", action="append", metavar="DATA_DIR",
                   help="drop arith questions found in this training data folder (repeatable; default: the data "
                        "folders the checkpoint's run and its SFT base recorded)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, bf16), cpu, cuda, cuda:N")
    p.add_argument("--output", help="result JSON path (default <model folder>/eval_results.json; a .md table beside)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
