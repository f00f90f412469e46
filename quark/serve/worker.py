"""The engine in a process of its own, for the server: `ProcessEngine` has the `Engine` methods the server uses.

Choices:
- Why a process: in one process the engine thread and the event loop share one GIL. Every torch op releases and
  retakes it, and while the event loop turns tokens into SSE chunks the engine waits to get it back, so the
  server ran on about one core however many it had (measured: 0.97 cores busy at 32 streams on a 2-core
  machine). The worker has its own interpreter and keeps a core busy with decode steps; the parent does HTTP.
  vLLM splits its server the same way.
- The worker loads the model itself (`load_for_inference`, same path, device and quantization), builds an
  ordinary `Engine` and runs its `step()` loop. The parent never holds the weights.
- One duplex pipe. Parent -> worker: ("load",) once, then ("submit", id, prompt, params), ("cancel", id),
  ("stop",). Worker -> parent: ("ready", info) (or ("failed", message)) once, then one (events, load) message
  per engine step that produced events or changed the load, where events are (id, kind, value) as `Engine` gives them to a sink. A reader thread in the parent
  hands each event to its request's sink, then runs `after_step` callbacks, as the in-thread engine does.
- Requests are checked in the parent (`check_request`, the same function `Engine.submit` uses), so a bad one
  is a ValueError at once, never a round trip.
- Supervised: when the worker dies, the reader thread reaps it (no zombie), names the real cause (exit code or
  signal), fails every request in flight with an ("error", ...) event and starts a new worker after a backoff
  (`backoff_s`, doubling per consecutive failure). While it does, `state` is "restarting" and submits raise
  RuntimeError; after `max_restarts` consecutive failures (a worker that ran `stable_s` resets the count) it is
  "failed" and the `on_failed` hooks run (`quark serve` then exits non-zero, so a supervisor or orchestrator can
  act). Counters in `load()` add up over every worker; `active`/`pending` are the live worker's only.
- A restart takes a standby: a second worker process started in advance that has imported torch and
  torch._dynamo (which the first module built imports lazily: ~4 of the ~8 s of a start on 2 busy cores) and
  waits for ("load",), so recovery costs only the model load (measured in dev/LOG.md: 2.3 s, was 7.7-11 s). It
  holds no weights (and no CUDA context) while it waits; it is replaced after each restart.
- Liveness: a thread in the worker writes the time (`time.monotonic()`, one clock for every process) into a
  shared double every `BEAT_S` (0.5 s); the reader thread checks it every 0.25 s. With no heartbeat and no
  message for `heartbeat_timeout` (3 s) the worker is "unresponsive" (stopped, e.g. SIGSTOP, or frozen holding
  the GIL): submits raise RuntimeError (the server answers 503 + Retry-After) and /health says so; it is "ok"
  again if it recovers. Silent for `hang_timeout` (30 s), or busy with requests in flight that got no event for
  `stall_timeout` (120 s: its main loop is wedged though the heartbeat thread runs; long enough for a first
  compile), it is killed and handled as any dead worker: its requests fail naming why, and it is restarted.
- A request the worker dropped by dying (in flight, or sent to it just as it died) is marked `engine_lost`, so
  the server can answer 503 + Retry-After (retry: a new worker is coming) rather than a 500; a submit that finds
  the pipe already broken raises RuntimeError at once.
- If the parent dies, the worker sees the pipe close and exits.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from .engine import KV_CACHE_MB, SamplingParams, check_request

log = logging.getLogger("quark.serve")
BEAT_S = 0.5  # the worker's heartbeat period
WATCH_S = 0.25  # how often the reader thread checks the heartbeat while no message comes
CUMULATIVE = ("steps", "tokens", "requests", "row_steps", "errors", "busy_s")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process loads and how it runs the engine (pickled to the spawned process)."""

    model_path: str
    device: str
    quantize: str | None
    stop_ids: tuple[int, ...] | None  # None: the tokenizer's <|im_end|> and <|endoftext|>
    max_batch: int
    seed: int | None
    prefix_cache_mb: float = 512
    max_context: int | None = None
    kv_cache_mb: float = KV_CACHE_MB


def _beat(beat: ctypes.c_double) -> None:
    while True:
        beat.value = time.monotonic()
        time.sleep(BEAT_S)


def _worker(conn: Connection, spec: WorkerSpec, beat: ctypes.c_double) -> None:
    threading.Thread(target=_beat, args=(beat,), name="quark-heartbeat", daemon=True).start()
    import torch
    import torch._dynamo  # noqa: F401 - imported lazily by the first module built under a device context (~4 s)

    from ..weights import load_for_inference
    from .engine import Engine

    try:  # imports done (seconds, most of a start): a standby waits here until it is needed
        if conn.recv() != ("load",):
            return
    except (EOFError, OSError, KeyboardInterrupt):
        return
    try:
        model, tokenizer = load_for_inference(spec.model_path, spec.device, spec.quantize)
        stops = list(spec.stop_ids) if spec.stop_ids is not None else tokenizer.stop_ids
        engine = Engine(model, stops, max_batch=spec.max_batch, seed=spec.seed, prefix_cache_mb=spec.prefix_cache_mb,
                        tokenizer=tokenizer, max_context=spec.max_context, kv_cache_mb=spec.kv_cache_mb)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"context_length": engine.context_length, "vocab_size": engine.vocab_size,
                         "threads": torch.get_num_threads()}))
    events: list = []
    live: dict = {}

    def sink(rid: int):
        def put(kind: str, value: object) -> None:
            events.append((rid, kind, value))
            if kind in ("done", "error"):
                live.pop(rid, None)
        return put

    idle_sent = True
    try:
        while True:
            busy = engine.rows or engine.pending
            while conn.poll(0 if busy else None):  # idle: block until the parent has something
                msg = conn.recv()
                if msg[0] == "submit":
                    _, rid, prompt, params = msg
                    try:
                        live[rid] = engine.submit(prompt, params, sink(rid))
                    except ValueError as e:
                        events.append((rid, "error", str(e)))
                elif msg[0] == "cancel":
                    if msg[1] in live:
                        live[msg[1]].cancel()
                elif msg[0] == "stop":  # skip interpreter teardown (seconds with torch loaded): nothing to flush
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
                busy = True
            worked = engine.step()
            if events or (worked or not idle_sent):
                conn.send((events, engine.load()))
                events = []
                idle_sent = not worked
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the parent went away


def describe_exit(exitcode: int | None) -> str:
    """multiprocessing's exit code -> words: "exited with code 3", "was killed by signal 9 (SIGKILL)"."""
    if exitcode is None:
        return "stopped answering (still running; killed)"
    if exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {-exitcode}{name}"
    return f"exited with code {exitcode}"


class RemoteRequest:
    """The parent's handle on one request in the worker."""

    _ids = itertools.count()

    def __init__(self, engine: ProcessEngine, prompt: Sequence[int], params: SamplingParams,
                 sink: Callable[[str, object], None]):
        self.id = next(self._ids)
        self.prompt, self.params, self.sink, self.engine = list(prompt), params, sink, engine
        self.cancelled = False
        self.finish_reason: str | None = None
        self.engine_lost = False  # failed because its worker died or was killed (the server answers 503)

    def cancel(self) -> None:
        if not self.cancelled and self.finish_reason is None:
            self.cancelled = True
            self.engine._send(("cancel", self.id))


class ProcessEngine:
    """An `Engine` running in a supervised child process (see the module docstring). Starts the worker and waits
    until the model is loaded; `start()` begins delivering events (and supervising), `stop()` ends the worker."""

    def __init__(self, model_path: str | Path, device: str = "cpu", quantize: str | None = None, *,
                 stop_ids: Sequence[int] | None = None, max_batch: int = 32, seed: int | None = None,
                 start_timeout: float = 600.0, max_restarts: int = 5, backoff_s: float = 0.5,
                 stable_s: float = 60.0, heartbeat_timeout: float = 3.0, hang_timeout: float = 30.0,
                 stall_timeout: float = 120.0, prefix_cache_mb: float = 512, max_context: int | None = None,
                 kv_cache_mb: float = KV_CACHE_MB):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, got {max_restarts!r}")
        if not BEAT_S < heartbeat_timeout <= hang_timeout:
            raise ValueError(f"heartbeat_timeout must be in ({BEAT_S}, hang_timeout={hang_timeout}] s, "
                             f"got {heartbeat_timeout}")
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be > 0 s, got {stall_timeout}")
        self.heartbeat_timeout, self.hang_timeout, self.stall_timeout = heartbeat_timeout, hang_timeout, stall_timeout
        self.model_path, self.start_timeout = str(model_path), start_timeout
        self._spec = WorkerSpec(str(model_path), device, quantize, None if stop_ids is None else tuple(stop_ids),
                                max_batch, seed, prefix_cache_mb, max_context, kv_cache_mb)
        self.max_batch, self.max_restarts, self.backoff_s, self.stable_s = max_batch, max_restarts, backoff_s, stable_s
        self._standby = None  # (process, connection, heartbeat) of a worker that has imported torch and waits
        self.proc, self.conn, self.beat = self._launch()
        info = self._activate(self.proc, self.conn)  # the first start is not retried: a bad model is an error now
        self.context_length, self.vocab_size = info["context_length"], info["vocab_size"]
        self.after_step: list[Callable[[], None]] = []
        self.on_failed: list[Callable[[], None]] = []
        self._requests: dict[int, RemoteRequest] = {}
        self._load = self._idle_load()
        self._totals = dict.fromkeys(CUMULATIVE, 0)
        self._totals["busy_s"] = 0.0
        self._lock = threading.Lock()  # state, conn and _requests change together
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._started_at = time.monotonic()
        self._failures = 0  # consecutive failed workers
        self.state = "ok"  # "ok" | "unresponsive" | "restarting" | "failed" (| "stopped")
        self.restarts = 0
        self.last_exit: str | None = None
        self._progress_at = time.monotonic()  # the last message from the worker, or the submit that woke it
        self._kill_cause: str | None = None  # why the reader killed the worker, if it did

    def _idle_load(self) -> dict:
        return {"active": 0, "pending": 0, "max_batch": self.max_batch, "steps": 0, "tokens": 0, "requests": 0,
                "peak_batch": 0, "row_steps": 0, "errors": 0, "busy_s": 0.0}

    def _launch(self):
        """Start a worker process, which imports what it needs and waits for ("load",): (process, connection,
        heartbeat), the last a shared double the worker keeps setting to `time.monotonic()`."""
        ctx = mp.get_context("spawn")  # never fork a process that holds threads (uvicorn, torch)
        conn, child = ctx.Pipe()
        beat = ctx.RawValue("d", time.monotonic())
        proc = ctx.Process(target=_worker, name="quark-engine", args=(child, self._spec, beat), daemon=True)
        proc.start()
        child.close()
        return proc, conn, beat

    def _activate(self, proc: mp.Process, conn: Connection) -> dict:
        """Tell a launched worker to load the model and wait until it has: its info; RuntimeError if it cannot."""
        path = self.model_path
        try:
            conn.send(("load",))
        except (BrokenPipeError, OSError):
            pass  # it is gone: recv below says how
        if not conn.poll(self.start_timeout):
            proc.kill()
            proc.join(5)
            conn.close()
            raise RuntimeError(f"the engine process did not load {path} within {self.start_timeout:.0f} s")
        try:
            kind, info = conn.recv()
        except (EOFError, OSError):
            proc.join(5)
            conn.close()
            raise RuntimeError(f"the engine process {describe_exit(proc.exitcode)} while loading {path}") from None
        if kind != "ready":
            proc.join(5)
            conn.close()
            raise RuntimeError(f"the engine process could not load {path}: {info}")
        return info

    def _prepare_standby(self) -> None:
        if self.max_restarts > 0 and self._standby is None and not self._stopping.is_set():
            self._standby = self._launch()

    def _drop_standby(self) -> None:
        if self._standby is not None:
            proc, conn, _ = self._standby
            self._standby = None
            conn.close()
            proc.kill()  # it holds nothing yet, and may be busy importing for seconds
            proc.join(5)

    def _send(self, msg: tuple) -> None:
        with self._lock:
            if self.state in ("ok", "unresponsive"):  # an unresponsive worker reads it if it recovers
                try:
                    self.conn.send(msg)
                except (BrokenPipeError, OSError):
                    pass  # the worker is gone: the reader sees the pipe close and fails what is in flight

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               sink: Callable[[str, object], None]) -> RemoteRequest:
        """Queue a prompt; ValueError if it cannot run, RuntimeError while the engine is restarting or failed."""
        check_request(prompt, params, self.vocab_size, self.context_length)
        req = RemoteRequest(self, prompt, params, sink)
        with self._lock:
            if self.state != "ok":
                raise RuntimeError(self.problem())
            if not self._requests:
                self._progress_at = time.monotonic()  # an idle worker owes no events until now
            try:
                self.conn.send(("submit", req.id, req.prompt, params))
            except (BrokenPipeError, OSError):  # it died a moment ago: the reader is about to restart it
                raise RuntimeError("the engine process has just exited; it is being restarted") from None
            self._requests[req.id] = req
        return req

    def problem(self) -> str | None:
        """Why the engine cannot take requests now, in one line; None while it can."""
        if self.state == "ok":
            return None
        if self.state == "unresponsive":
            silent = time.monotonic() - max(self.beat.value, self._progress_at)
            return (f"the engine is unresponsive: the engine process (pid {self.proc.pid}) has not answered for "
                    f"{silent:.1f} s (stopped or frozen); it is killed and restarted after {self.hang_timeout:g} s")
        return f"the engine is {self.state}: the engine process {self.last_exit}"

    def cancel(self, req: RemoteRequest) -> None:
        req.cancel()

    def load(self) -> dict:
        """The live worker's active/pending rows; counters summed over every worker this engine has run."""
        live = dict(self._load)
        for k in CUMULATIVE:
            live[k] = live.get(k, 0) + self._totals[k]
        return {**live, "restarts": self.restarts, "last_exit": self.last_exit, "worker_pid": self.proc.pid,
                "problem": self.problem()}

    def start(self) -> ProcessEngine:
        if self._reader is None:
            self._reader = threading.Thread(target=self._supervise, name="quark-engine-reader", daemon=True)
            self._reader.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._send(("stop",))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        if self.state in ("ok", "unresponsive"):
            self.state = "stopped"
        self.conn.close()
        if self._reader is not None:
            self._reader.join(15)
            self._reader = None
        self._drop_standby()

    def _supervise(self) -> None:
        """The reader thread: deliver events until the worker dies, then reap it and restart it (or give up)."""
        self._prepare_standby()
        while True:
            self._read(self.conn)
            if self._stopping.is_set():
                break
            self.proc.join(5)  # reap it: no zombie, and the real exit code
            if self.proc.is_alive():  # the pipe closed but the process hangs on
                self.proc.kill()
                self.proc.join(5)
            cause, self._kill_cause = self._kill_cause or describe_exit(self.proc.exitcode), None
            if time.monotonic() - self._started_at >= self.stable_s:
                self._failures = 0
            self._fail_in_flight(cause)
            if not self._restart(cause):
                break
        with self._lock:
            self._fail_in_flight_locked(self.last_exit or "stopped")

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                if not conn.poll(WATCH_S):
                    self._watch()
                    continue
                events, load = conn.recv()
            except (EOFError, OSError):
                return
            self._progress_at = time.monotonic()
            if self.state == "unresponsive":
                self._responding_again()
            self._load = load
            for rid, kind, value in events:
                req = self._requests.get(rid)
                if req is None:
                    continue
                if kind in ("done", "error"):
                    req.finish_reason = value if kind == "done" else "error"
                    self._requests.pop(rid, None)
                req.sink(kind, value)
            for hook in self.after_step:
                hook()

    def _watch(self) -> None:
        """The heartbeat check (reader thread, while no message comes): see the module docstring."""
        if self._kill_cause is not None or self._stopping.is_set():
            return  # killed already (its pipe closes in a moment), or stopping
        now = time.monotonic()
        silent = now - max(self.beat.value, self._progress_at)
        stalled = now - self._progress_at if self._requests else 0.0
        if silent > self.hang_timeout or stalled > self.stall_timeout:
            self._kill_cause = (f"stopped responding (no heartbeat for {silent:.0f} s), so it was killed"
                                if silent > self.hang_timeout else f"made no progress on its requests for "
                                f"{stalled:.0f} s (wedged), so it was killed")
            log.error("quark serve: the engine process (pid %s) %s", self.proc.pid, self._kill_cause)
            self.proc.kill()  # works on a stopped process too; the reader then sees the pipe close
        elif silent > self.heartbeat_timeout and self.state == "ok":
            with self._lock:
                self.state = "unresponsive"
            log.warning("quark serve: the engine process (pid %s) has not answered for %.1f s; it is killed after "
                        "%g s", self.proc.pid, silent, self.hang_timeout)
        elif silent <= self.heartbeat_timeout and self.state == "unresponsive":
            self._responding_again()

    def _responding_again(self) -> None:
        with self._lock:
            if self.state == "unresponsive":
                self.state = "ok"
        log.warning("quark serve: the engine process (pid %s) is responding again", self.proc.pid)

    def _fail_in_flight(self, cause: str) -> None:
        with self._lock:
            self.state, self.last_exit = "restarting", cause
            for k in CUMULATIVE:
                self._totals[k] += self._load.get(k, 0)
            self._load = {**self._idle_load(), "peak_batch": self._load.get("peak_batch", 0)}
            self._fail_in_flight_locked(cause)

    def _fail_in_flight_locked(self, cause: str) -> None:
        failed, self._requests = list(self._requests.values()), {}
        for req in failed:
            req.finish_reason, req.engine_lost = "error", True
            req.sink("error", f"the engine process {cause}")
        if failed:
            for hook in self.after_step:
                hook()

    def _restart(self, cause: str) -> bool:
        """Start a new worker after a backoff; False (state "failed", `on_failed` run) once the budget is spent."""
        while not self._stopping.is_set():
            if self._failures >= self.max_restarts:
                self.state = "failed"
                log.error("quark serve: the engine process %s; giving up after %d restart(s) in a row",
                          cause, self._failures)
                for hook in self.on_failed:
                    hook()
                return False
            delay = self.backoff_s * 2 ** self._failures
            self._failures += 1
            log.warning("quark serve: the engine process (pid %s) %s; restarting it in %.1f s (attempt %d of %d)",
                        self.proc.pid, cause, delay, self._failures, self.max_restarts)
            if self._stopping.wait(delay):
                break
            proc, conn, beat = self._standby if self._standby and self._standby[0].is_alive() else self._launch()
            if self._standby is not None and self._standby[0] is not proc:
                self._drop_standby()  # it died while it waited
            self._standby = None
            try:
                self._activate(proc, conn)
            except RuntimeError as e:
                cause = str(e).removeprefix("the engine process ")
                self.last_exit = cause
                continue
            if self._stopping.is_set():  # stop() came while this one loaded
                proc.kill()
                proc.join(5)
                conn.close()
                break
            with self._lock:
                self.conn.close()
                self.proc, self.conn, self.beat, self.state = proc, conn, beat, "ok"
                self._progress_at = time.monotonic()
                self.restarts += 1
                self._started_at = time.monotonic()
            log.warning("quark serve: the engine process is back (pid %s)", proc.pid)
            self._prepare_standby()
            return True
        return False
