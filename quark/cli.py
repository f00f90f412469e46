"""The `quark` command. Each subcommand lives beside the code it drives; this file only assembles them.

Choices:
- Every module listed in COMMAND_MODULES exposes `add_commands(subparsers)`, which adds its parsers and sets
  `func` to a plain function taking the parsed args. Modules import their heavy dependencies inside those
  functions, so `quark --help` stays fast and a missing optional extra only breaks the command that needs it.
- Errors the user can fix (ValueError, FileNotFoundError, ...) print one line `quark <cmd>: error: ...` and
  exit 2, never a traceback; `QUARK_DEBUG=1` shows the traceback.
- This is the one place where I/O failures of every command become that line: an OSError from the system (read-only
  folder, full disk, missing permission, ...) prints `<path>: <what>; <what to do>`, and so does safetensors'
  SafetensorError, which wraps the OS error in its text. Writers keep earlier outputs intact by writing to a
  temporary file and renaming it (`quark.io.atomic_write_bytes`), and name the file they were writing.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

COMMAND_MODULES = [
    "quark.cli",            # info
    "quark.tokenizer_cli",  # tokenizer train / stats
    "quark.data.cli",       # prepare
    "quark.train.cli",      # pretrain, sft
    "quark.hf.cli",         # export
    "quark.eval.cli",       # eval
    "quark.serve.cli",      # chat, serve
    "quark.speedrun_cli",   # speedrun
    "quark.quantize_cli",   # quantize
]
OS_ERROR_HINTS = {  # errno -> what the user can do about it
    errno.ENOSPC: "free some space or write to another disk, then rerun",
    errno.EDQUOT: "free some space or write elsewhere, then rerun",
    errno.EROFS: "choose an output folder on a writable file system, then rerun",
    errno.EACCES: "choose a folder you may write to, or fix its permissions, then rerun",
    errno.EPERM: "choose a folder you may write to, or fix its permissions, then rerun",
}


def os_error_message(e: OSError) -> str:
    """`<path>: <what>; <what to do>` for an OSError raised by the system; our own OSErrors carry their message."""
    if e.errno is None:
        return str(e)
    where = e.filename if e.filename is not None else "(a file being written)"
    hint = OS_ERROR_HINTS.get(e.errno)
    return f"{where}: {e.strerror or os.strerror(e.errno)}" + (f"; {hint}" if hint else "")


def _as_os_error(e: BaseException) -> OSError | None:
    if isinstance(e, OSError):
        return e
    if "os error" in str(e):  # a Rust writer (safetensors, tokenizers) that bypassed quark.io's wrappers
        from .io import write_error

        return write_error(e, f"(a file being written by {type(e).__module__.split('.')[0]})")
    return None


def cmd_info(args: argparse.Namespace) -> None:
    from .config import QuarkConfig
    from .weights import config_for

    cfg = config_for(args.model) if args.model else QuarkConfig.from_name(args.preset)
    n = cfg.n_params()
    print(f"{'preset' if not args.model else 'model'}: {args.model or args.preset}")
    for k, v in cfg.to_dict().items():
        print(f"  {k:16s} {v}")
    print(f"parameters: {n:,} ({n / 1e6:.1f}M; embedding rows {cfg.vocab_size:,}, tied={cfg.tie_embeddings})")
    print(f"KV cache per token: {cfg.kv_cache_bytes_per_token(2):,} bytes (bf16), "
          f"{cfg.kv_cache_bytes_per_token(4):,} bytes (fp32); "
          f"full {cfg.context_length}-token context: {cfg.kv_cache_bytes_per_token(2) * cfg.context_length / 2**20:.1f} MiB (bf16)")
    print(f"training FLOPs per token: {cfg.flops_per_token():.3g}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a preset's or model folder's architecture, parameter count, KV-cache size")
    p.add_argument("--preset", default="quark-72m", help="named preset (default quark-72m)")
    p.add_argument("--model", help="a model folder, checkpoint or .gguf file instead of a preset")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="quark", description="Train, fine-tune, evaluate and serve Quark models.")
    parser.add_argument("--version", action="version", version=f"quark {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the module itself is not there (yet); its dependencies must be
                continue
            raise
        mod.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # libgomp reads OMP_WAIT_POLICY when torch loads, which `import quark` has already done: this reaches only the
    # processes a command starts (torchrun, serve's engine worker). chat/serve own the machine: libgomp's spin-then-
    # sleep default plus decode threads on the free cores (quark/cpu_settings.py); other commands' children share
    # it: passive.
    if (sys.argv[1:] if argv is None else argv)[:1] not in (["chat"], ["serve"]):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"quark {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as e:
        if os.environ.get("QUARK_DEBUG"):
            raise
        print(f"quark {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only I/O failures are reported here; anything else is re-raised
        err = _as_os_error(e)
        if err is None or os.environ.get("QUARK_DEBUG"):
            raise
        print(f"quark {args.command}: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
