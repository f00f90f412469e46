"""Probe cases against the server and its sampling, one test each, each with the request that first showed the
problem: temperatures that overflowed float32, a frozen or just-killed engine worker, refused-but-ignored
fields, and HTTP edges below the app (malformed request lines, a body that never arrives)."""

import os
import queue
import signal
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from quark.cli import main  # noqa: E402
from quark.serve.engine import Engine, SamplingParams  # noqa: E402
from quark.serve.server import ServerThread, create_app  # noqa: E402
from quark.serve.worker import ProcessEngine  # noqa: E402
from quark.weights import load_tokenizer_for, save_model  # noqa: E402

from .test_chat import chat, reference_reply  # noqa: E402
from .test_serve_engine import contextual  # noqa: E402
from .test_serve_limits import error  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    engine = Engine(contextual(1), [tiny_tokenizer.im_end_id, tiny_tokenizer.eot_id], max_batch=4)
    with ServerThread(create_app(engine, tiny_tokenizer, "m", body_timeout=0.5)) as s:
        yield s


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer):
    f = tmp_path_factory.mktemp("probe") / "model"
    save_model(contextual(3), f)
    tiny_tokenizer.save(f)
    return f


def raw_http(url: str, request: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send bytes on a fresh connection; (everything the server sent until it closed, seconds until it closed)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):  # a timeout here (socket.timeout) fails the test: the server held it open
            out += chunk
    return out, time.monotonic() - t0


def json_error(raw: bytes, status: int) -> dict:
    import json

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), raw[:200]
    assert b"content-type: application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


# ---- 2. temperature ------------------------------------------------------------------------------------------
def test_probe_temperature_tiny(server):
    """`temperature: 1e-40` -> 500 'probability tensor contains either inf, nan' with a seed, an empty reply
    without one. Now any finite T > 0 works: as T -> 0 it is greedy."""
    body = {"prompt": "Hello world", "max_tokens": 12, "repetition_penalty": 1.0}
    greedy = httpx.post(server.url + "/v1/completions", json={**body, "temperature": 0}, timeout=60)
    assert greedy.status_code == 200 and greedy.json()["choices"][0]["text"]
    for extra in ({"seed": 7}, {}):
        for t in (1e-40, 1e-30, 5e-324):
            r = httpx.post(server.url + "/v1/completions", json={**body, "temperature": t, **extra}, timeout=60)
            assert r.status_code == 200, (t, extra, r.text)
            assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"], (t, extra)


def test_probe_chat_temperature_tiny(tiny_tokenizer):
    """`quark chat --temperature 1e-40` failed as the server did; it now replies what greedy decoding does."""
    model = contextual(3)
    params = SamplingParams(max_new_tokens=12, temperature=1e-40, top_p=0.9, rep_penalty=1.15, seed=3)
    out = chat(model, tiny_tokenizer, ["Hello there"], params)
    want = reference_reply(model, tiny_tokenizer, [{"role": "user", "content": "Hello there"}], params)
    assert want and want in out


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_probe_chat_temperature_nan(folder, value, capsys):
    """`quark chat --temperature nan` was accepted and replied nothing: now exit 2, one line naming the field."""
    assert main(["chat", "--model", str(folder), "--temperature", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quark chat: error: temperature must be a finite number >= 0") and "\n" not in err, err
    with pytest.raises(ValueError, match="rep_penalty must be a finite number > 0"):
        SamplingParams(rep_penalty=float("inf")).check()


# ---- 8. fields that were ignored -----------------------------------------------------------------------------
def test_probe_presence_penalty_type(server):
    """`presence_penalty: "x"` returned 200: now a 400 naming the field."""
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "presence_penalty": "x"})
    err = error(r, 400)
    assert err["param"] == "presence_penalty" and "must be a number" in err["message"]


def test_probe_frequency_penalty_range(server):
    """`frequency_penalty: 99` returned 200: out of OpenAI's [-2, 2] is a 400, and in range only 0 is accepted
    (the penalty is not implemented; repetition_penalty is)."""
    msgs = [{"role": "user", "content": "hi"}]
    err = error(httpx.post(server.url + "/v1/chat/completions", json={
        "messages": msgs, "max_tokens": 2, "frequency_penalty": 99}), 400)
    assert err["param"] == "frequency_penalty" and "[-2.0, 2.0]" in err["message"] and "99" in err["message"]
    for name in ("frequency_penalty", "presence_penalty"):
        err = error(httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, name: 0.5}),
                    400, "unsupported_parameter")
        assert err["param"] == name and "repetition_penalty" in err["message"]
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, name: 0}, timeout=60)
        assert ok.status_code == 200


def test_probe_response_format(server):
    """`response_format` returned 200 (ignored). Now JSON formats are served (tests/test_serve_features.py) and a
    malformed one is a 400 naming the field; {"type": "text"} is plain text."""
    msgs = [{"role": "user", "content": "hi"}]
    for fmt in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}, "json", {"type": "xml"}):
        err = error(httpx.post(server.url + "/v1/chat/completions", json={
            "messages": msgs, "max_tokens": 2, "response_format": fmt}), 400, "invalid_response_format")
        assert err["param"] == "response_format"
    ok = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": msgs, "max_tokens": 2, "response_format": {"type": "text"}}, timeout=60)
    assert ok.status_code == 200


# ---- 8. HTTP edges -------------------------------------------------------------------------------------------
def test_probe_negative_content_length(server):
    """A negative Content-Length got a plain-text 400: now the OpenAI JSON error body."""
    raw, _ = raw_http(server.url, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n"
                      b"Content-Type: application/json\r\n\r\n{}")
    err = json_error(raw, 400)
    assert err["code"] == "bad_http_request" and "Content-Length" in err["message"]


def test_probe_garbage_request_line(server):
    """A garbage request line got a plain-text 400: now the OpenAI JSON error body."""
    raw, _ = raw_http(server.url, b"\x16\x03\x01 garbage / not-http\r\n\r\n")
    assert json_error(raw, 400)["code"] == "bad_http_request"


def test_probe_slow_body(server):
    """A declared Content-Length larger than the body held the connection with no read timeout (1,000 such
    connections stayed open 30 s): now a 408 JSON error after `body_timeout` (0.5 s here), and the connection
    closes."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    raw, took = raw_http(server.url, head + b'{"prompt": ', timeout=10)
    err = json_error(raw, 408)
    assert err["code"] == "request_timeout" and "11 of 100 bytes" in err["message"]
    assert 0.4 < took < 5, took
    assert httpx.get(server.url + "/health").status_code == 200


# ---- 3. a frozen or just-killed worker -----------------------------------------------------------------------
def test_probe_health_sigstop(folder):
    """SIGSTOP of the engine worker with 5 requests in flight: /health said 200 "ok" throughout and the requests
    hung until SIGCONT. Now /health is 503 "unresponsive" within the heartbeat timeout, new requests get 503 +
    Retry-After, the stopped worker is killed after `hang_timeout` (its requests fail with 503 naming why), and a
    new one takes over."""
    e = ProcessEngine(folder, "cpu", stop_ids=[], max_batch=4, max_restarts=2, backoff_s=0.1,
                      heartbeat_timeout=2.0, hang_timeout=4.0)
    pid = e.proc.pid
    results: list = []

    def client(k: int) -> None:
        results.append(httpx.post(url + "/v1/completions", json={"prompt": f"hi {k}", "max_tokens": 40}, timeout=60))

    try:
        with ServerThread(create_app(e, load_tokenizer_for(folder), "m", restart_wait=0.2)) as s:
            url = s.url
            assert httpx.get(url + "/health").json()["status"] == "ok"
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            threads = [threading.Thread(target=client, args=(k,)) for k in range(5)]
            for t in threads:
                t.start()
            while (h := httpx.get(url + "/health")).status_code == 200:
                assert time.monotonic() - stopped < 5, "/health stayed 'ok' with the worker stopped"
                time.sleep(0.05)
            assert h.status_code == 503 and h.json()["status"] == "unresponsive" and h.headers["retry-after"] == "1"
            assert f"(pid {pid}) has not answered" in h.json()["problem"]
            late = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert error(late, 503, "engine_unavailable") and late.headers["retry-after"] == "1"
            for t in threads:
                t.join(30)
            ended = time.monotonic() - stopped
            assert len(results) == 5 and ended < 4.0 + 5, ended  # bounded by hang_timeout, not by SIGCONT
            for r in results:  # in flight when it froze (killed after 4 s), or refused while it was frozen
                err = error(r, 503, "engine_unavailable")
                assert r.headers["retry-after"] == "1" and ("stopped responding" in err["message"]
                                                             or "unresponsive" in err["message"]), err
            assert any("stopped responding (no heartbeat for" in r.json()["error"]["message"] for r in results)
            while (h := httpx.get(url + "/health")).status_code != 200:
                assert time.monotonic() - stopped < 60, "the stopped worker was not replaced"
                time.sleep(0.1)
            assert h.json()["restarts"] == 1 and h.json()["worker_pid"] != pid
            ok = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
            assert ok.status_code == 200
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_probe_health_sigcont_recovers(folder):
    """The other half: a worker stopped for less than `hang_timeout` shows "unresponsive", then "ok" again once
    continued, and is not restarted."""
    e = ProcessEngine(folder, "cpu", stop_ids=[], max_batch=2, max_restarts=1, heartbeat_timeout=1.0,
                      hang_timeout=30.0).start()
    try:
        os.kill(e.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while e.state != "unresponsive":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="the engine is unresponsive"):
            e.submit([5, 6], SamplingParams(2), lambda *a: None)
        os.kill(e.proc.pid, signal.SIGCONT)
        while e.state != "ok":
            assert time.monotonic() < deadline + 5
            time.sleep(0.05)
        q = queue.SimpleQueue()
        e.submit([5, 6], SamplingParams(3, 0.0), lambda k, v: q.put((k, v)))
        assert [q.get(timeout=30)[0] for _ in range(4)] == ["token"] * 3 + ["done"] and e.restarts == 0
    finally:
        e.stop()


def test_probe_request_right_after_sigkill(folder, monkeypatch):
    """Requests arriving within ~0.02 s after a SIGKILL of the worker (before the supervisor noticed) got a 500:
    now 503 + Retry-After. The supervisor is held at that moment (it has seen the pipe close but not yet failed
    anything) so the requests land in that window every time."""
    e = ProcessEngine(folder, "cpu", stop_ids=[], max_batch=2, max_restarts=0)  # no restart: a shorter test
    noticed, go = threading.Event(), threading.Event()
    fail_in_flight = e._fail_in_flight

    def held(cause: str) -> None:
        noticed.set()
        go.wait(30)
        fail_in_flight(cause)

    monkeypatch.setattr(e, "_fail_in_flight", held)
    results: list = []
    with ServerThread(create_app(e, load_tokenizer_for(folder), "m")) as s:
        os.kill(e.proc.pid, signal.SIGKILL)
        assert noticed.wait(30) and e.state == "ok"  # the window: dead, not yet marked
        threads = [threading.Thread(target=lambda k=k: results.append(httpx.post(
            s.url + "/v1/completions", json={"prompt": f"hi {k}", "max_tokens": 4, "stream": k == 2}, timeout=60)))
            for k in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(results) + len(e._requests) < 3 and time.monotonic() < deadline:  # answered, or submitted
            time.sleep(0.02)
        go.set()
        for t in threads:
            t.join(60)
    assert len(results) == 3
    for r in results:
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "engine_unavailable"
