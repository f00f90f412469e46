"""The OpenAI-compatible HTTP server (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, /health, and
the chat web page at /.

Choices:
- The engine (`Engine` in a thread, or `ProcessEngine` in a worker process, which `quark serve` uses) owns the
  model; each HTTP request submits one engine request per choice. Engine events
  are collected in a list and handed to the event loop once per engine step (one `call_soon_threadsafe` for
  the whole batch, not one per token), then sorted into each HTTP request's asyncio queue. Streams drain
  every event already queued before writing, so a slow client gets fewer, larger SSE chunks.
- A stream whose client goes away is cancelled in the generator's `finally` (Starlette cancels the response
  task on disconnect), which frees the engine slot at the next step. A non-streaming request checks for a
  departed client every 0.25 s while it waits.
- Bodies are capped (`max_body_bytes`, default 1 MiB) before parsing: a bigger body is a 413, read no further.
  A body not complete within `body_timeout` (default 10 s; a client that declares more bytes than it sends)
  is a 408 and the connection is closed. Requests uvicorn cannot parse get a JSON 400 (quark/serve/wire.py).
- With `api_key`, every /v1 route needs `Authorization: Bearer <key>` (compared in constant time); /health
  and the page itself stay open (the page asks for the key). The key is never logged or echoed.
- Admission control, before any engine work: a request may ask for at most `max_request_seqs` sequences
  (prompts x n, counted before tokenizing) and `max_request_tokens` tokens ((prompt + max_tokens) x n), else
  400. Sequences submitted and not yet finished are counted here (released by their final engine event, so a
  client that vanishes cannot leak them); a request that would take them over `max_batch + max_queue` gets 429
  with `Retry-After`. /health only reads counters, so it answers at once however busy the engine is.
- Engine state: while a supervised worker restarts or is unresponsive (`ProcessEngine.state`: no heartbeat for a
  few seconds), a request waits up to `restart_wait` seconds for it, then gets 503 with `Retry-After`; /health
  says "ok" (200), "unresponsive", "restarting" or "failed" (503, with the engine's `problem` in words), so a
  load balancer or orchestrator can act. A request the worker lost by dying (`engine_lost`) gets 503 with
  `Retry-After` too (a stream: that error as its last event), never a 500.
- Browser safety (Host allow-list, Origin check, CORS) is `quark.serve.guard.BrowserGuard`, in front of it all.
- HEAD is answered wherever GET is.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenizer import Tokenizer
from .api import (
    APIError,
    Job,
    check_budget,
    check_model,
    count_sequences,
    parse_common,
    parse_completion_prompts,
    parse_json,
    parse_messages,
)
from .completion import Completion
from .engine import Engine
from .guard import BrowserGuard, check_origin

STATIC = Path(__file__).parent / "static"
RECOVERING = ("restarting", "unresponsive")  # engine states that may end by themselves: wait, Retry-After: 1


class _Dispatcher:
    """Engine thread -> event loop, one hand-over per engine step."""

    def __init__(self, engine: Engine):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock = threading.Lock()
        self.events: list = []
        self.scheduled = False
        self.outstanding = 0  # sequences submitted whose final event has not come yet
        engine.after_step.append(self.flush)

    def reserve(self, n: int, capacity: int) -> bool:
        with self.lock:
            if self.outstanding + n > capacity:
                return False
            self.outstanding += n
            return True

    def release(self, n: int) -> None:
        with self.lock:
            self.outstanding -= n

    def sink(self, queue: asyncio.Queue, k: int):
        def put(kind: str, value: object) -> None:
            with self.lock:
                self.events.append((queue, (k, kind, value)))
                if kind in ("done", "error"):  # every sequence ends with exactly one of them
                    self.outstanding -= 1
        return put

    def flush(self) -> None:  # engine thread
        with self.lock:
            if not self.events or self.scheduled or self.loop is None:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:  # event loop
        with self.lock:
            events, self.events, self.scheduled = self.events, [], False
        for queue, event in events:
            queue.put_nowait(event)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for and how much may wait (see the module docstring); checked by `create_app`."""

    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    max_request_seqs: int = 64
    max_queue: int = 128
    max_request_tokens: int | None = None  # None: the engine's whole cache (max_batch x context length)
    restart_wait: float = 10.0
    body_timeout: float = 10.0

    def check(self, engine: Engine) -> Limits:
        """These limits, checked against the engine, with `max_request_tokens` filled in."""
        for name, v in (("max_tokens_limit", self.max_tokens_limit), ("max_request_seqs", self.max_request_seqs),
                        ("max_request_tokens", self.max_request_tokens or 1)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.body_timeout > 0:
            raise ValueError(f"body_timeout must be > 0 s, got {self.body_timeout!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        capacity = engine.max_batch + self.max_queue  # sequences decoding or waiting for a row
        if self.max_request_seqs > capacity:
            raise ValueError(f"max_request_seqs ({self.max_request_seqs}) must be at most max_batch + max_queue "
                             f"({capacity}), or such a request could never be admitted")
        return replace(self, max_request_tokens=self.max_request_tokens or engine.max_batch * engine.context_length)


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, *, api_key: str | None = None,
               max_tokens_limit: int = 1024, max_body_bytes: int = 1 << 20, max_request_seqs: int = 64,
               max_queue: int = 128, max_request_tokens: int | None = None, restart_wait: float = 10.0,
               body_timeout: float = 10.0, bound_host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = (),
               allowed_origins: tuple[str, ...] = ()) -> FastAPI:
    """The app. The engine is started and stopped with the app's lifespan. `max_request_tokens` defaults to
    the engine's whole cache (max_batch x context length)."""
    limits = Limits(max_tokens_limit, max_body_bytes, max_request_seqs, max_queue, max_request_tokens,
                    restart_wait, body_timeout).check(engine)
    allowed_origins = tuple(check_origin(o) for o in allowed_origins)  # a bad one is an error now, not at startup
    server = _Server(engine, tokenizer, model_name, api_key, limits)
    app = FastAPI(title="Quark", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BrowserGuard, bound_host=bound_host, allowed_hosts=allowed_hosts,
                       allowed_origins=allowed_origins)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
    get = ["GET", "HEAD"]
    app.add_api_route("/health", server.health, methods=get)
    app.add_api_route("/v1/models", server.models, methods=get)
    app.add_api_route("/v1/models/{name:path}", server.model, methods=get)
    app.add_api_route("/", server.index, methods=get, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    return app


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)


async def _crash(request: Request, e: Exception) -> JSONResponse:
    err = APIError(500, f"internal error: {type(e).__name__}", type_="server_error")
    return JSONResponse(err.body(), status_code=500)


class _Server:
    """The app's state (engine, tokenizer, limits, the dispatcher) and its route handlers."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None, limits: Limits):
        self.engine, self.tokenizer, self.model_name, self.api_key, self.limits = (
            engine, tokenizer, model_name, api_key, limits)
        self.context = engine.context_length
        self.capacity = engine.max_batch + limits.max_queue
        self.created = int(time.time())
        self.dispatcher = _Dispatcher(engine)
        if isinstance(engine, Engine) and engine.tokenizer is None:
            engine.tokenizer = tokenizer  # structured output builds its grammar's vocabulary from it

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.dispatcher.loop = asyncio.get_running_loop()
        self.engine.start()
        # the ~190,000 objects of startup (torch, FastAPI) leave every full collection: a gen-2 pass over them stalled
        # the event loop, /health included, for 753 ms under overload (186 ms after this; dev/LOG.md)
        gc.collect()
        gc.freeze()
        yield
        self.engine.stop()

    # ---- requests -----------------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> dict:
        self.authorize(request)
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {length} bytes is over the {limit}-byte limit",
                           code="request_too_large")
        raw = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                raw.extend(chunk)
                if len(raw) > limit:
                    raise APIError(413, f"request body is over the {limit}-byte limit", code="request_too_large")

        try:
            await asyncio.wait_for(read(), self.limits.body_timeout)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s ({len(raw)} "
                           f"of {length or 'an unknown number of'} bytes); send the whole body at once",
                           code="request_timeout", close=True) from None
        return parse_json(bytes(raw))

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "quark",
                "context_length": self.context, "max_tokens_limit": self.limits.max_tokens_limit}

    # ---- routes -------------------------------------------------------------------------------------------------
    async def health(self):
        state = self.engine.state
        body = {"status": state, "model": self.model_name, "context_length": self.context, **self.engine.load(),
                "in_flight": self.dispatcher.outstanding, "capacity": self.capacity}
        if state == "ok":
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"} if state in RECOVERING else None)

    async def models(self, request: Request):
        self.authorize(request)
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, name: str, request: Request):
        self.authorize(request)
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return self.model_card()

    async def index(self):
        return FileResponse(STATIC / "index.html")

    async def chat_completions(self, request: Request):
        body = await self.read_body(request)
        check_model(body, self.model_name)
        self.room_for(count_sequences(body, self.limits.max_request_seqs, chat=True))
        messages = parse_messages(body)
        job = parse_common(body, [self.tokenizer.render_prompt(messages)], self.context,
                           self.limits.max_tokens_limit, chat=True)
        return await self.run(job, request, chat=True)

    async def completions(self, request: Request):
        body = await self.read_body(request)
        check_model(body, self.model_name)
        self.room_for(count_sequences(body, self.limits.max_request_seqs, chat=False))
        job = parse_common(body, parse_completion_prompts(body, self.tokenizer), self.context,
                           self.limits.max_tokens_limit)
        return await self.run(job, request, chat=False)

    # ---- admission ----------------------------------------------------------------------------------------------
    async def engine_ready(self) -> None:
        """Wait (briefly) while the engine restarts or is unresponsive; 503 with Retry-After if it is not back in
        time."""
        engine = self.engine
        deadline = time.monotonic() + self.limits.restart_wait
        while engine.state in RECOVERING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine.state != "ok":
            problem = getattr(engine, "problem", lambda: None)() or f"the engine is {engine.state}"
            raise APIError(503, f"{problem}; try again shortly", type_="server_error", code="engine_unavailable",
                           retry_after=1 if engine.state in RECOVERING else 10)

    def busy(self, seqs: int) -> APIError:
        return APIError(429, f"the server is busy: {self.dispatcher.outstanding} sequences are running or queued "
                        f"and this request needs {seqs} more (room for {self.capacity}: --max-batch + "
                        "--max-queue); retry after the Retry-After seconds", type_="requests", code="queue_full",
                        retry_after=1)

    def room_for(self, seqs: int) -> None:
        """A full server refuses before tokenizing anything (the binding check is `admit`, just before submit)."""
        if self.dispatcher.outstanding + seqs > self.capacity:
            raise self.busy(seqs)

    def admit(self, job: Job) -> int:
        seqs = len(job.prompts) * job.n
        if not self.dispatcher.reserve(seqs, self.capacity):
            raise self.busy(seqs)
        return seqs

    async def run(self, job: Job, request: Request, chat: bool):
        check_budget(job, self.limits.max_request_tokens)
        await self.engine_ready()
        completion = Completion(self, job, chat)
        completion.submit(self.admit(job))
        if not job.stream:
            return await completion.whole(request)
        return StreamingResponse(completion.sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ServerThread:
    """Runs an app with uvicorn in a background thread on a loopback port (0 = a free one): for tests, benchmarks
    and notebooks. `with ServerThread(app) as s: ... s.url ...`"""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket
        import threading

        import uvicorn

        from .wire import uvicorn_config

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn_config(app, host, port, log_level))
        # serve() rather than run(): the same server, and a test may stand in for `uvicorn.Server.run` (quark serve)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), name="quark-uvicorn",
                                       daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
