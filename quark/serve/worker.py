"""The engine in a process of its own, for the server: `ProcessEngine` has the `Engine` methods the server uses.

Choices:
- Why a process: in one process the engine thread and the event loop share one GIL. Every torch op releases and
  retakes it, and while the event loop turns tokens into SSE chunks the engine waits to get it back, so the
  server ran on about one core however many it had (measured: 0.97 cores busy at 32 streams on a 2-core
  machine). The worker has its own interpreter and keeps a core busy with decode steps; the parent does HTTP.
  vLLM splits its server the same way.
- The worker loads the model itself (`load_for_inference`, same path, device and quantization), builds an
  ordinary `Engine` and runs its `step()` loop. The parent never holds the weights.
- One duplex pipe. Parent -> worker: ("submit", id, prompt, params), ("cancel", id), ("stop",). Worker ->
  parent: ("ready", info) once, then one (events, load) message per engine step that produced events or changed
  the load, where events are (id, kind, value) as `Engine` gives them to a sink. A reader thread in the parent
  hands each event to its request's sink, then runs `after_step` callbacks, as the in-thread engine does.
- Requests are checked in the parent (`check_request`, the same function `Engine.submit` uses), so a bad one
  is a ValueError at once, never a round trip.
- If the worker dies, every request in flight gets an ("error", ...) event and later submits raise
  RuntimeError. If the parent dies, the worker sees the pipe close and exits.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import threading
from collections.abc import Callable, Sequence

from .engine import SamplingParams, check_request


def _worker(conn, model_path: str, device: str, quantize: str | None, stop_ids: Sequence[int] | None,
            max_batch: int, seed: int | None) -> None:
    import torch

    from ..weights import load_for_inference
    from .engine import Engine

    try:
        model, tokenizer = load_for_inference(model_path, device, quantize)
        stops = list(stop_ids) if stop_ids is not None else [tokenizer.im_end_id, tokenizer.eot_id]
        engine = Engine(model, stops, max_batch=max_batch, seed=seed)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"context_length": engine.context_length, "vocab_size": engine.vocab_size,
                         "threads": torch.get_num_threads()}))
    events: list = []
    live: dict = {}

    def sink(rid: int):
        def put(kind, value):
            events.append((rid, kind, value))
            if kind != "token":
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
                elif msg[0] == "stop":
                    return
                busy = True
            worked = engine.step()
            if events or (worked or not idle_sent):
                conn.send((events, engine.load()))
                events = []
                idle_sent = not worked
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the parent went away


class RemoteRequest:
    """The parent's handle on one request in the worker."""

    _ids = itertools.count()

    def __init__(self, engine: ProcessEngine, prompt: Sequence[int], params: SamplingParams,
                 sink: Callable[[str, object], None]):
        self.id = next(self._ids)
        self.prompt, self.params, self.sink, self.engine = list(prompt), params, sink, engine
        self.cancelled = False
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        if not self.cancelled and self.finish_reason is None:
            self.cancelled = True
            self.engine._send(("cancel", self.id))


class ProcessEngine:
    """An `Engine` running in a child process (see the module docstring). Starts the worker and waits until the
    model is loaded; `start()` begins delivering events, `stop()` ends the worker."""

    def __init__(self, model_path: str, device: str = "cpu", quantize: str | None = None,
                 stop_ids: Sequence[int] | None = None, max_batch: int = 32, seed: int | None = None,
                 start_timeout: float = 600.0):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        ctx = mp.get_context("spawn")  # never fork a process that holds threads (uvicorn, torch)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, name="quark-engine",
                                args=(child, str(model_path), device, quantize, stop_ids, max_batch, seed),
                                daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(start_timeout):
            self.proc.kill()
            raise RuntimeError(f"the engine process did not load {model_path} within {start_timeout:.0f} s")
        try:
            kind, info = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited while loading {model_path} "
                               f"(exit code {self.proc.join(5) or self.proc.exitcode})") from None
        if kind != "ready":
            self.proc.join(5)
            raise RuntimeError(f"the engine process could not load {model_path}: {info}")
        self.context_length, self.vocab_size = info["context_length"], info["vocab_size"]
        self.max_batch = max_batch
        self.after_step: list[Callable[[], None]] = []
        self._requests: dict[int, RemoteRequest] = {}
        self._load = {"active": 0, "pending": 0, "max_batch": max_batch, "steps": 0, "tokens": 0, "requests": 0,
                      "peak_batch": 0, "errors": 0, "busy_s": 0.0}
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.dead: str | None = None

    def _send(self, msg) -> None:
        with self._send_lock:
            if self.dead is None:
                try:
                    self.conn.send(msg)
                except (BrokenPipeError, OSError):
                    self.dead = "the engine process is gone"

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               sink: Callable[[str, object], None]) -> RemoteRequest:
        """Queue a prompt; ValueError if it cannot run, RuntimeError if the engine process has died."""
        check_request(prompt, params, self.vocab_size, self.context_length)
        if self.dead is not None:
            raise RuntimeError(f"the engine is not running: {self.dead}")
        req = RemoteRequest(self, prompt, params, sink)
        self._requests[req.id] = req
        self._send(("submit", req.id, req.prompt, params))
        return req

    def cancel(self, req: RemoteRequest) -> None:
        req.cancel()

    def load(self) -> dict:
        return dict(self._load)

    def start(self) -> ProcessEngine:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="quark-engine-reader", daemon=True)
            self._reader.start()
        return self

    def stop(self) -> None:
        self._send(("stop",))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.dead = self.dead or "stopped"
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None

    def _read(self) -> None:
        while True:
            try:
                events, load = self.conn.recv()
            except (EOFError, OSError):
                break
            self._load = load
            for rid, kind, value in events:
                req = self._requests.get(rid)
                if req is None:
                    continue
                if kind != "token":
                    req.finish_reason = value if kind == "done" else "error"
                    del self._requests[rid]
                req.sink(kind, value)
            for hook in self.after_step:
                hook()
        if self.dead is None:
            self.dead = f"the engine process exited (exit code {self.proc.exitcode})"
        for req in list(self._requests.values()):
            req.finish_reason = "error"
            req.sink("error", self.dead)
        self._requests.clear()
        for hook in self.after_step:
            hook()
