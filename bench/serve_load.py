"""Load test for `quark serve`: N concurrent streaming chat clients on loopback for a bounded time.

Starts `quark serve` as a subprocess on a free loopback port (a random-weight `tiny` preset model with a tokenizer
trained on the Python standard library, unless --model is given), then for each concurrency level (default 1, then
32) runs that many clients, each sending streaming /v1/chat/completions requests back to back for --duration
seconds (levels alternate in --rounds short rounds, so changes in the machine's load hit both alike). Reports
requests/s, completion tokens/s (from the `usage` of each stream; a stream still running at the deadline counts the
share of its chunks that came before it, so the drain after the deadline, with fewer than N streams left, is not
part of the level's figure), p50/p95 time-to-first-token and request latency, the share of wall time the engine
spent in steps, the mean decode batch, and errors (which must be 0). The peer figure is the same
server at concurrency 1 (no batching possible), measured in the same run; the ratio is the gain from continuous
batching (target >= 8x at 32).

    python bench/serve_load.py [--model M] [--duration 20] [--concurrency 1 32] [--max-tokens 64]

Fault mode: `--kill-worker-at S` runs the highest concurrency level once for --duration seconds and SIGKILLs the
server's engine worker (its pid from /health) S seconds in. It reports the requests that failed and how
long service was interrupted: from the kill to the first token of a request served by the restarted worker (and
to /health saying "ok" again). Clients honour Retry-After on 429/503, as the OpenAI SDK does.

Overload mode: `--saturate` runs twice as many clients as the server admits (--max-batch + --max-queue, here
32 + 32) plus one client that keeps sending an oversized request, `{"prompt": ["a"] * 10000, "n": 16, "max_tokens": 1}`,
and reports what was served, what was refused (429 / 400, expected), any other error (must be none), and
/health's latency meanwhile.

Prefix-cache mode: `--chat-turns N` starts two servers on the model, one with the prefix cache (default budget)
and one with `--prefix-cache-mb 0`, and plays the same N-turn conversation (greedy, a system prompt of notes and
user turns of notes + a question, growing to about `--chat-tokens` tokens) on each, alternating server by
server, `--rounds` times (each round's conversation opens differently, so its first turn is a cold start). Prints
time to first token per turn with and without the cache, their ratio, and whether the replies were the same.

    python bench/serve_load.py --model /tmp/smol_q --chat-turns 10 [--chat-tokens 1500] [--prefix-cache-mb 0]

`--prefix-cache-mb MB` is passed to the server in the other modes (0: off), to compare throughput with and without.

Needs aiohttp (the load generator; lighter than httpx, so it takes less CPU from the server it measures). The
server runs faster with `uvicorn[standard]` (uvloop + httptools), which the output says whether it has.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SATURATE_QUEUE = 32  # --max-queue of the server in --saturate mode
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion briefly.",
             "How do I sort a list in Python?", "Give me three tips for sleeping well.", "What is 17 * 23?"]


def make_model(folder: Path, preset: str) -> Path:
    """A random-weight model of `preset` with a BPE tokenizer trained on stdlib sources (same vocab size)."""
    import sysconfig

    from quark.config import QuarkConfig
    from quark.model import Quark
    from quark.tokenizer import train_tokenizer
    from quark.weights import save_model

    cfg = QuarkConfig.from_name(preset)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.rglob("*.py"))[:1500]]
    tok = train_tokenizer(texts, vocab_size=(cfg.vocab_size - 2), show_progress=False)
    save_model(Quark(cfg).init_weights(0), folder)
    tok.save(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_client(session, url: str, model: str, deadline: float, max_tokens: int, idx: int, out: list) -> None:
    """Streams requests back to back until the deadline. Parses only what is measured (the first content chunk,
    the usage chunk), so the client, which shares the CPU with the server, stays cheap."""
    import aiohttp

    i = idx
    while time.perf_counter() < deadline:
        body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": max_tokens, "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
        i += 1
        t0 = time.perf_counter()
        ttft, tokens, done, usage, error, retry_after = None, 0, False, False, None, 0.0
        chunks, chunks_in = 0, 0  # content chunks, and those that arrived before the deadline
        try:
            async with session.post(url, json=body) as r:
                if r.status == 200:
                    async for raw in r.content:  # one SSE line at a time
                        line = raw.decode().rstrip("\n")
                        if '"delta": {"content": "' in line:
                            now = time.perf_counter()
                            if ttft is None:
                                ttft = now - t0
                            chunks += 1
                            chunks_in += now <= deadline
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith('data: {"error"'):
                            error = line[6:200]
                            break
                        elif '"usage": {' in line:
                            tokens, usage = json.loads(line[6:])["usage"]["completion_tokens"], True
                    if error is None and not (done and usage):
                        error = "the stream ended without its usage chunk and [DONE]"
                else:
                    error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                    retry_after = float(r.headers.get("Retry-After", 0)) if r.status in (429, 503) else 0.0
        except aiohttp.ClientError as e:
            error = f"{type(e).__name__}: {e}"
        # a reply may legitimately be empty (the model's first token is <|im_end|>): counted, not an error
        end = time.perf_counter()
        in_window = tokens * chunks_in / chunks if chunks else tokens * (end <= deadline)
        out.append({"ok": error is None, "error": error, "ttft": ttft, "latency": end - t0, "tokens": tokens,
                    "tokens_in_window": in_window, "done_in_window": end <= deadline, "start": t0,
                    "first_token_at": None if ttft is None else t0 + ttft})
        if retry_after:
            await asyncio.sleep(retry_after)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def probe_health(base: str, seconds: float) -> None:
    """`--probe`: GET /health every 0.1 s for `seconds` on one kept-alive connection (as a load balancer's probe),
    print the latencies as JSON. A process of its own, so the load generator's busy event loop is not measured."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    out, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        out.append(time.perf_counter() - t0)
        time.sleep(0.1)
    print(json.dumps(out))


async def run_level(base: str, model: str, concurrency: int, duration: float, max_tokens: int) -> dict:
    import aiohttp

    out: list = []
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    probe = await asyncio.create_subprocess_exec(sys.executable, __file__, "--probe", base, str(duration - 0.5),
                                                 stdout=subprocess.PIPE)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(one_client(session, base + "/v1/chat/completions", model, deadline, max_tokens, k, out)
                               for k in range(concurrency)))
    health = json.loads((await probe.communicate())[0] or b"[]")
    # the figures cover the timed window only: after the deadline no new request starts and the last ones drain
    # with fewer than `concurrency` streams, which would otherwise count against the level
    return {"concurrency": concurrency, "wall_s": duration, "elapsed_s": time.perf_counter() - start, "out": out,
            "health": health}


async def run_with_kill(base: str, model: str, args) -> dict:
    """One level at the highest concurrency; SIGKILL the worker at --kill-worker-at seconds; time the recovery."""
    import aiohttp

    concurrency = max(args.concurrency)
    out: list = []
    marks: dict = {}

    async def killer(session):
        await asyncio.sleep(args.kill_worker_at)
        async with session.get(base + "/health") as r:
            pid = (await r.json())["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        marks.update(kill=time.perf_counter(), pid=pid)
        while time.perf_counter() - marks["kill"] < 120:
            t0 = time.perf_counter()
            async with session.get(base + "/health") as r:
                h = await r.json()
            marks.setdefault("latency", []).append(time.perf_counter() - t0)
            if h["status"] == "ok" and h["restarts"] >= 1:
                marks.update(health_ok=time.perf_counter(), health=h)
                return
            if h["status"] not in marks.setdefault("seen", []):
                marks["seen"].append(h["status"])
            await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter()
        deadline = start + args.duration
        await asyncio.gather(killer(session), *(
            one_client(session, base + "/v1/chat/completions", model, deadline, args.max_tokens, k, out)
            for k in range(concurrency)))
    kill = marks["kill"]
    firsts = [r["first_token_at"] for r in out if r["first_token_at"] is not None and r["first_token_at"] > kill]
    failed = [r for r in out if not r["ok"]]
    return {"concurrency": concurrency, "requests": len(out), "failed": len(failed),
            "in_flight_failed": sum(r["start"] < kill for r in failed),
            "error_samples": sorted({r["error"][:160] for r in failed})[:3], "pid": marks["pid"],
            "seen": marks.get("seen"), "health": marks.get("health"), "health_max": max(marks.get("latency", [0])),
            "to_first_token": (min(firsts) - kill) if firsts else None,
            "to_health_ok": marks["health_ok"] - kill if "health_ok" in marks else None,
            "ok_after": sum(r["ok"] and r["start"] > kill for r in out)}


async def run_saturated(base: str, model: str, args) -> int:
    """More clients than the server admits, plus the 160,000-sequence request; /health probed meanwhile."""
    import aiohttp

    concurrency = 2 * (max(args.concurrency) + SATURATE_QUEUE)
    out: list = []
    big: list = []

    async def flood(session, deadline):
        body = {"prompt": ["a"] * 10000, "n": 16, "max_tokens": 1}
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with session.post(base + "/v1/completions", json=body) as r:
                big.append((r.status, (await r.json())["error"].get("code"), time.perf_counter() - t0))
            await asyncio.sleep(0.5)

    probe = await asyncio.create_subprocess_exec(sys.executable, __file__, "--probe", base, str(args.duration - 0.5),
                                                 stdout=subprocess.PIPE)
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        deadline = time.perf_counter() + args.duration
        await asyncio.gather(flood(session, deadline), *(
            one_client(session, base + "/v1/chat/completions", model, deadline, args.max_tokens, k, out)
            for k in range(concurrency)))
    health = json.loads((await probe.communicate())[0] or b"[]")
    refused = [r for r in out if not r["ok"] and r["error"].startswith("HTTP 429")]
    other = [r for r in out if not r["ok"] and not r["error"].startswith("HTTP 429")]
    print(f"saturated: {concurrency} clients for {args.duration:.0f} s against room for {max(args.concurrency)} + "
          f"{SATURATE_QUEUE}: {sum(r['ok'] for r in out)} served, {len(refused)} refused with 429, {len(other)} other "
          f"errors; the 10000 x 16 request: {len(big)} sent, answered {sorted({(s, c) for s, c, _ in big})} in at "
          f"most {max((t for *_, t in big), default=0) * 1e3:.0f} ms")
    print(f"/health meanwhile (a probe process, every 0.1 s): p50 {pct(health, 0.5) * 1e3:.1f} ms, p99 "
          f"{pct(health, 0.99) * 1e3:.1f} ms, max {max(health, default=float('nan')) * 1e3:.1f} ms over "
          f"{len(health)} probes")
    for e in sorted({r["error"][:160] for r in other})[:3]:
        print(f"  error: {e}")
    return 1 if other else 0


def report_kill(res: dict, args) -> int:
    h = res["health"] or {}
    print(f"fault mode: {res['concurrency']} clients for {args.duration:.0f} s, engine worker (pid {res['pid']}) "
          f"SIGKILLed at {args.kill_worker_at:.0f} s; /health said {' then '.join(res['seen'] or [])} until back")
    print(f"requests: {res['requests']}, failed {res['failed']} ({res['in_flight_failed']} of them in flight at the "
          f"kill), {res['ok_after']} served after it")
    for e in res["error_samples"]:
        print(f"  failure: {e}")
    if res["to_first_token"] is None or res["to_health_ok"] is None:
        print("NOT RECOVERED within the run")
        return 1
    print(f"service interrupted {res['to_first_token']:.1f} s (kill -> first token from the restarted worker); "
          f"/health back to 'ok' after {res['to_health_ok']:.1f} s; server says: last exit "
          f"{h.get('last_exit')!r}, restarts {h.get('restarts')}; /health answered within "
          f"{res['health_max'] * 1e3:.0f} ms throughout")
    return 0


def notes(n_chars: int, seed: int) -> list[str]:
    """Paragraphs of real English (stdlib docstrings), about `n_chars` each, in an order set by `seed`."""
    import argparse as a
    import collections as c
    import json as j
    import logging as lg
    import random
    import subprocess as sp
    import textwrap as tw

    text = " ".join(" ".join((m.__doc__ or "").split()) for m in (a, c, j, lg, sp, tw, asyncio, socket))
    parts = [text[i:i + n_chars] for i in range(0, len(text) - n_chars, n_chars)]
    random.Random(seed).shuffle(parts)
    return parts


async def chat_turns(base: str, model: str, turns: int, tokens: int, seed: int) -> list[dict]:
    """One conversation of `turns` greedy streaming turns; per turn: prompt tokens, TTFT, reply."""
    import aiohttp

    per_turn = max(64, (tokens - 400) // turns * 3)  # characters of notes per user turn (~3 characters a token)
    paras = notes(per_turn, seed)
    msgs = [{"role": "system", "content": f"Session {seed}. You are a careful assistant. Background notes: "
                                          + paras[0][:1200]}]
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for t in range(turns):
            msgs.append({"role": "user", "content": f"More notes: {paras[1 + t % (len(paras) - 1)]}\n"
                                                    f"{QUESTIONS[t % len(QUESTIONS)]}"})
            body = {"model": model, "messages": msgs, "max_tokens": 48, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0, ttft, reply, usage = time.perf_counter(), None, [], None
            async with session.post(base + "/v1/chat/completions", json=body) as r:
                async for raw in r.content:
                    line = raw.decode().rstrip("\n")
                    if not line.startswith("data: {"):
                        continue
                    d = json.loads(line[6:])
                    if d.get("usage"):
                        usage = d["usage"]
                    for ch in d["choices"]:
                        piece = ch["delta"].get("content")
                        if piece or ch["finish_reason"]:
                            ttft = ttft or time.perf_counter() - t0
                        reply.append(piece or "")
            msgs.append({"role": "assistant", "content": "".join(reply)})
            out.append({"turn": t + 1, "prompt_tokens": usage["prompt_tokens"], "ttft": ttft, "reply": "".join(reply)})
    return out


def run_chat_turns(folder: Path, args) -> int:
    """--chat-turns: the same conversations on a server with the prefix cache and one without (module docstring)."""
    servers = {"cache": start_server(folder, args, []), "no cache": start_server(folder, args, ["--prefix-cache-mb", "0"])}
    runs: dict[str, list[list[dict]]] = {k: [] for k in servers}
    try:
        for _, base, model in servers.values():
            asyncio.run(chat_turns(base, model, 2, 300, seed=10_000))  # warm-up: compiles, thread tuning
        for r in range(args.rounds):
            for name, (_, base, model) in servers.items():
                runs[name].append(asyncio.run(chat_turns(base, model, args.chat_turns, args.chat_tokens, seed=r)))
        stats = httpx.get(servers["cache"][1] + "/health").json().get("prefix_cache")
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(f"model {folder.name} | {args.chat_turns}-turn greedy chat, max_tokens 48, {args.rounds} rounds (median) | "
          f"server torch threads {args.threads} | CPU cores {os.cpu_count()}")
    print(f"{'turn':>4} {'prompt':>7} {'TTFT no cache':>14} {'TTFT cache':>11} {'ratio':>6}")
    ratios = []
    for t in range(args.chat_turns):
        cold = pct([run[t]["ttft"] for run in runs["no cache"]], 0.5)
        warm = pct([run[t]["ttft"] for run in runs["cache"]], 0.5)
        ratios += [warm / cold] if t else []
        print(f"{t + 1:>4} {runs['cache'][0][t]['prompt_tokens']:>7} {cold * 1e3:>12.0f}ms {warm * 1e3:>9.0f}ms "
              f"{warm / cold:>6.2f}")
    same = all(a["reply"] == b["reply"] for x, y in zip(runs["cache"], runs["no cache"]) for a, b in zip(x, y))
    print(f"turns 2-{args.chat_turns}: TTFT with the cache / without: mean {sum(ratios) / len(ratios):.2f}, worst "
          f"{max(ratios):.2f} (target <= 0.3); replies identical with and without the cache: {same}")
    print(f"prefix cache counters (/health): {json.dumps(stats)}")
    return 0 if same else 1


def start_server(folder: Path, args, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    """`quark serve` on a free port: (process, base URL, model id) once it answers."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "quark", "serve", "--model", str(folder), "--port", str(port),
           "--max-batch", str(max(args.concurrency)), "--log-level", "warning", "--device", "cpu", *extra]
    cmd += ["--max-queue", str(SATURATE_QUEUE)] if args.saturate else []
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600  # a real model on a busy machine loads for minutes
    while True:
        try:
            return server, base, httpx.get(base + "/v1/models", timeout=2).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()  # else reading its output waits for a server that is still loading
                print(server.stdout.read())
                raise SystemExit("the server did not start") from None
            time.sleep(0.3)


def merge(rounds: list[dict], engine: dict) -> dict:
    out = [r for rd in rounds for r in rd["out"]]
    wall = sum(rd["wall_s"] for rd in rounds)
    good = [r for r in out if r["ok"]]
    tokens = sum(r["tokens_in_window"] for r in good)
    ttft = [r["ttft"] for r in good if r["ttft"] is not None]
    return {"concurrency": rounds[0]["concurrency"], "requests": len(good), "errors": len(out) - len(good),
            "error_samples": sorted({r["error"] for r in out if not r["ok"]})[:3],
            "empty": sum(r["tokens"] == 0 for r in good),
            "wall_s": wall, "req_per_s": sum(r["done_in_window"] for r in good) / wall, "tok_per_s": tokens / wall,
            "engine_busy": engine["busy_s"] / sum(rd["elapsed_s"] for rd in rounds),
            "mean_batch": engine["row_steps"] / max(1, engine["steps"]),
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "lat_p50": pct([r["latency"] for r in good], 0.5), "lat_p95": pct([r["latency"] for r in good], 0.95),
            "health": [h for rd in rounds for h in rd["health"]]}


def main() -> int:
    if sys.argv[1:2] == ["--probe"]:
        probe_health(sys.argv[2], float(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: a random-weight model of --preset, built in a temp dir)")
    ap.add_argument("--preset", default="tiny", help="preset for the default model (default tiny)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level (default 20)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="levels to run (default 1 32)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per level (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server (default 1)")
    ap.add_argument("--kill-worker-at", type=float, metavar="S",
                    help="fault mode: SIGKILL the engine worker S seconds into one run at the highest concurrency")
    ap.add_argument("--saturate", action="store_true",
                    help="overload mode: twice the clients the server admits, plus a 160,000-sequence request")
    ap.add_argument("--chat-turns", type=int, metavar="N", help="prefix-cache mode: an N-turn chat, TTFT per turn "
                    "with and without the prefix cache (two servers)")
    ap.add_argument("--chat-tokens", type=int, default=1500, help="--chat-turns: tokens the chat grows to (~1500)")
    ap.add_argument("--prefix-cache-mb", type=float, help="the server's --prefix-cache-mb (default: its own)")
    args = ap.parse_args()
    if args.kill_worker_at is not None and not 0 < args.kill_worker_at < args.duration:
        raise SystemExit(f"--kill-worker-at must be in (0, --duration={args.duration}), got {args.kill_worker_at}")
    if importlib.util.find_spec("aiohttp") is None:
        raise SystemExit("bench/serve_load.py needs aiohttp for its load generator: pip install aiohttp")
    sys.path.insert(0, str(ROOT))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else make_model(Path(tmp) / f"{args.preset}-random", args.preset)
        if args.chat_turns:
            return run_chat_turns(folder, args)
        extra = [] if args.prefix_cache_mb is None else ["--prefix-cache-mb", str(args.prefix_cache_mb)]
        server, base, model = start_server(folder, args, extra)
        try:
            asyncio.run(run_level(base, model, 2, 2.0, 8))  # warm-up
            if args.kill_worker_at is not None:
                return report_kill(asyncio.run(run_with_kill(base, model, args)), args)
            if args.saturate:
                return asyncio.run(run_saturated(base, model, args))
            # levels alternate in short rounds, so a change in the machine's load hits each level alike
            rounds: dict[int, list[dict]] = {c: [] for c in args.concurrency}
            keys = ("busy_s", "steps", "row_steps")  # engine counters, summed per level
            engine: dict[int, dict] = {c: dict.fromkeys(keys, 0) for c in args.concurrency}
            for _ in range(args.rounds):
                for c in args.concurrency:
                    before = httpx.get(base + "/health").json()
                    rounds[c].append(asyncio.run(run_level(base, model, c, args.duration / args.rounds,
                                                           args.max_tokens)))
                    after = httpx.get(base + "/health").json()
                    for k in keys:
                        engine[c][k] += after[k] - before[k]
            results = [merge(rounds[c], engine[c]) for c in args.concurrency]
            health = httpx.get(base + "/health").json()
        finally:
            server.terminate()
            server.wait(timeout=30)

    fast = all(importlib.util.find_spec(m) for m in ("uvloop", "httptools"))
    print(f"model {folder.name} | {args.duration:.0f} s per level | max_tokens {args.max_tokens} | "
          f"server torch threads {args.threads} | CPU cores {os.cpu_count()} | "
          f"uvicorn {'with' if fast else 'without'} uvloop+httptools")
    print(f"{'conc':>5} {'reqs':>6} {'errors':>6} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'lat p50':>8} {'lat p95':>8} {'engine busy':>11} {'batch':>6}")
    for r in results:
        print(f"{r['concurrency']:>5} {r['requests']:>6} {r['errors']:>6} {r['req_per_s']:>7.2f} "
              f"{r['tok_per_s']:>8.1f} {r['ttft_p50'] * 1e3:>7.0f}ms {r['ttft_p95'] * 1e3:>7.0f}ms "
              f"{r['lat_p50']:>7.2f}s {r['lat_p95']:>7.2f}s {r['engine_busy']:>10.0%} {r['mean_batch']:>6.1f}")
    print(f"engine: peak batch {health['peak_batch']}, {health['steps']} decode steps, {health['tokens']} tokens, "
          f"{health['errors']} engine errors")
    for r in results:
        print(f"/health at concurrency {r['concurrency']} (a probe process, every 0.1 s): p50 "
              f"{pct(r['health'], 0.5) * 1e3:.1f} ms, p99 {pct(r['health'], 0.99) * 1e3:.1f} ms, max "
              f"{max(r['health'], default=float('nan')) * 1e3:.1f} ms over {len(r['health'])} probes")
    lo = min(results, key=lambda r: r["concurrency"])
    hi = max(results, key=lambda r: r["concurrency"])
    if hi is not lo and lo["tok_per_s"] > 0:
        ratio = hi["tok_per_s"] / lo["tok_per_s"]
        print(f"aggregate tokens/s: ours (concurrency {hi['concurrency']}, batched) {hi['tok_per_s']:.1f} vs peer "
              f"(concurrency {lo['concurrency']}, same server) {lo['tok_per_s']:.1f}: {ratio:.1f}x (target >= 8x)")
    empty = sum(r["empty"] for r in results)
    if empty:
        print(f"{empty} replies were empty (the model's first token was a stop token): counted as requests")
    errors = sum(r["errors"] for r in results)
    if errors:
        print(f"ERRORS: {errors}: " + "; ".join(e for r in results for e in r["error_samples"]))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
