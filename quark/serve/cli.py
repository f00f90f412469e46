"""`quark chat` and `quark serve`: argument parsing and model loading for the terminal chat and the server.

Choices:
- Defaults are the model card's recommended configuration, read from `quark.sampling.RECOMMENDED`. The server binds 127.0.0.1 unless --host says otherwise, and warns when it is public.
- The port is bound before the model loads and the socket handed to uvicorn: a port in use is one line naming it
  (exit 2) within a second, not uvicorn's log after the load; `--port 0` takes a free port, printed in the banner.
- `--device auto` picks CUDA when present (weights in bf16 there), else the CPU in fp32.
- `--quantize int8` calls `quark.quantize.quantize_int8(model)`, imported only when asked for.
- The API key may come from --api-key or QUARK_API_KEY; it is never printed.
- The engine worker is supervised (`quark.serve.worker.ProcessEngine`): once it has failed --max-restarts times
  in a row, the server stops and the command exits non-zero, for a supervisor or orchestrator to act on. A worker
  silent (no heartbeat) for --hang-timeout seconds, or making no progress on its requests for --stall-timeout,
  is killed and restarted the same way.
- `--prefix-cache-mb` (default 512) bounds the engine's prefix cache (quark/serve/prefix_cache.py); 0 is off.
- Browser safety: --allowed-hosts / --allowed-origins widen `quark.serve.guard.BrowserGuard`'s allow-lists.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from pathlib import Path

from ..sampling import RECOMMENDED as CARD
from ..weights import load_for_inference, resolve_device
from .engine import KV_CACHE_MB, SamplingParams
from .prefix_cache import DEFAULT_MB as PREFIX_MB

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder, checkpoint, or run folder (newest checkpoint)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight quantization (quark.quantize)")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.rep_penalty, args.seed)
    params.check()
    return params


def cmd_chat(args: argparse.Namespace) -> None:
    from ..llm import LLM
    from .chat import run_chat

    params = _sampling_params(args)
    run_chat(LLM.load(args.model, args.device, args.quantize), params, system=args.system)


def cmd_serve(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if not args.hang_timeout >= 3 or not args.stall_timeout > 0:  # 3 s: when /health starts saying "unresponsive"
        raise ValueError(f"--hang-timeout must be >= 3 and --stall-timeout > 0 (seconds), got {args.hang_timeout:g} "
                         f"and {args.stall_timeout:g}")
    if args.ctx_size is not None and args.ctx_size < 1 or not args.kv_cache_mb > 0:
        raise ValueError(f"--ctx-size must be >= 1 and --kv-cache-mb > 0, got {args.ctx_size} and {args.kv_cache_mb:g}")
    if not args.prefix_cache_mb >= 0:
        raise ValueError(f"--prefix-cache-mb must be >= 0 (0: no prefix cache), got {args.prefix_cache_mb:g}")
    with listen(args.host, args.port) as sock:  # before the model loads: a port in use fails at once
        _serve(args, sock)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) as uvicorn binds one; a port in use or an address not on this machine is a
    ValueError naming it (uvicorn would log the OS error and exit 1)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT port is free; a listening one is not
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        what = {errno.EADDRINUSE: f"port {port} on {host} is in use (another server, or an earlier quark serve); "
                                  "stop it or choose another --port",
                errno.EACCES: f"port {port} on {host} needs privileges (ports below 1024); choose --port 1024 or above",
                errno.EADDRNOTAVAIL: f"--host {host} is not an address of this machine; use 127.0.0.1 or one of its "
                                     "addresses"}.get(e.errno)
        if what is None:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; check --host and --port") from None
        raise ValueError(what) from None
    return sock


def _serve(args: argparse.Namespace, sock: socket.socket) -> None:
    import uvicorn

    from .engine import Engine
    from .server import create_app
    from .wire import uvicorn_config

    api_key = args.api_key or os.environ.get("QUARK_API_KEY") or None
    name = args.model_name or Path(args.model).resolve().name
    hosts, origins = _split(args.allowed_hosts), _split(args.allowed_origins)
    if args.engine == "process":
        from ..weights import load_tokenizer_for
        from .worker import ProcessEngine

        tokenizer = load_tokenizer_for(args.model)
        engine = ProcessEngine(args.model, resolve_device(args.device), args.quantize,
                               stop_ids=tokenizer.stop_ids, max_batch=args.max_batch,
                               max_restarts=args.max_restarts, hang_timeout=args.hang_timeout,
                               stall_timeout=args.stall_timeout, prefix_cache_mb=args.prefix_cache_mb,
                               max_context=args.ctx_size, kv_cache_mb=args.kv_cache_mb)
    else:
        model, tokenizer = load_for_inference(args.model, args.device, args.quantize)
        engine = Engine(model, tokenizer.stop_ids, max_batch=args.max_batch, prefix_cache_mb=args.prefix_cache_mb,
                        tokenizer=tokenizer, max_context=args.ctx_size, kv_cache_mb=args.kv_cache_mb)
    app = create_app(engine, tokenizer, name, api_key=api_key, max_tokens_limit=args.max_tokens_limit,
                     max_request_seqs=args.max_request_seqs, max_queue=args.max_queue,
                     max_request_tokens=args.max_request_tokens or None, bound_host=args.host,
                     allowed_hosts=hosts, allowed_origins=origins)
    host_shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"quark serve: model '{name}' on http://{host_shown}:{sock.getsockname()[1]}/ (OpenAI API under /v1, chat page at /; "
          f"batch up to {args.max_batch}, max_tokens limit {args.max_tokens_limit}; "
          f"API key {'required' if api_key else 'not required'})", flush=True)
    if args.host not in LOOPBACK:
        print(f"quark serve: warning: listening on {args.host}, reachable from other machines"
              + ("" if api_key else " without an API key (set --api-key)"), flush=True)
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level, timeout_graceful_shutdown=5))
    if hasattr(engine, "on_failed"):
        engine.on_failed.append(lambda: setattr(server, "should_exit", True))
    server.run(sockets=[sock])
    if engine.state == "failed":
        raise RuntimeError(f"the engine process {engine.last_exit}; it failed {args.max_restarts + 1} time(s) in a "
                           f"row (--max-restarts {args.max_restarts}), so the server stopped")


def _split(values: list[str] | None) -> tuple[str, ...]:
    """Repeated and/or comma-separated flag values -> one tuple."""
    return tuple(v.strip() for arg in values or () for v in arg.split(",") if v.strip())


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="multi-turn terminal chat with a model (streams replies)")
    _add_model_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=CARD["temperature"], help=f"0 = greedy (default {CARD['temperature']})")
    p.add_argument("--top-p", type=float, default=CARD["top_p"], help=f"nucleus threshold in (0, 1] (default {CARD['top_p']})")
    p.add_argument("--rep-penalty", type=float, default=CARD["rep_penalty"], help=f"repetition penalty (default {CARD['rep_penalty']})")
    p.add_argument("--max-new-tokens", type=int, default=CARD["max_new_tokens"], help=f"reply length cap (default {CARD['max_new_tokens']})")
    p.add_argument("--seed", type=int, help="sampling seed (reproducible replies)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching, plus a chat page")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set QUARK_API_KEY)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--ctx-size", type=int, metavar="N", help="tokens per sequence (prompt + reply; default: the "
                   "model's context, as far as --kv-cache-mb allows)")
    p.add_argument("--kv-cache-mb", type=float, default=KV_CACHE_MB, metavar="MB",
                   help=f"memory of the KV cache of all --max-batch sequences (default {KV_CACHE_MB}); the context "
                   "per sequence is cut to fit (shown on /health as context_length)")
    p.add_argument("--prefix-cache-mb", type=float, default=PREFIX_MB, metavar="MB",
                   help=f"memory for the prefix cache: K/V of earlier prompts and replies, reused by requests that "
                   f"start with the same tokens (default {PREFIX_MB}; 0 turns it off; counters on /health)")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="server-wide cap on a request's max_tokens (default 1024; the context caps it too)")
    p.add_argument("--max-request-seqs", type=int, default=64,
                   help="most sequences (prompts x n) one request may ask for (default 64)")
    p.add_argument("--max-request-tokens", type=int, default=0,
                   help="most tokens ((prompt + max_tokens) x n) one request may use (default: max-batch x context)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="sequences that may wait for a batch slot; beyond it requests get 429 (default 128)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="engine worker restarts in a row before the server exits non-zero (default 5)")
    p.add_argument("--hang-timeout", type=float, default=30.0,
                   help="seconds without a heartbeat from the engine worker (stopped or frozen) before it is killed "
                        "and restarted, failing its requests; /health says 'unresponsive' after 3 s (default 30)")
    p.add_argument("--stall-timeout", type=float, default=120.0,
                   help="seconds the engine worker may go without progress on requests in flight before it is "
                        "killed and restarted (default 120: room for a first compile)")
    p.add_argument("--allowed-hosts", action="append", metavar="NAMES",
                   help="Host names to answer besides the bound address and localhost (comma-separated; '*' = any)")
    p.add_argument("--allowed-origins", action="append", metavar="ORIGINS",
                   help="web origins (scheme://host[:port], comma-separated; '*' = any) allowed to call the API "
                        "from a browser (CORS); others get 403 on POST")
    p.add_argument("--model-name", help="the model id clients send (default: the model folder's name)")
    p.add_argument("--engine", default="process", choices=["process", "thread"],
                   help="where decoding runs: a worker process with its own GIL (default; uses a second core) or "
                        "a thread of the server process")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
