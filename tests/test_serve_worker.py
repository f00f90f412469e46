"""The engine in a worker process (`quark.serve.worker.ProcessEngine`): the same tokens as the in-thread engine,
cancellation, errors in the parent, a dead worker (restarted under load; given up on past its budget), and
`quark serve` (whose default it is) end to end, including its non-zero exit once the worker cannot be kept up."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from quark.serve.engine import Engine, SamplingParams
from quark.serve.worker import ProcessEngine
from quark.weights import save_model

from .test_serve_engine import CFG, contextual, prompts, run_all

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer):
    f = tmp_path_factory.mktemp("worker") / "model"
    save_model(contextual(3), f)
    tiny_tokenizer.save(f)
    return f


@pytest.fixture(scope="module")
def engine(folder):
    e = ProcessEngine(folder, "cpu", stop_ids=[CFG.vocab_size - 1], max_batch=4).start()
    yield e
    e.stop()


def collect(engine, ps, params):
    """Submit every prompt at once; wait for all; [(tokens, finish)]."""
    q = queue.SimpleQueue()
    reqs = [engine.submit(p, prm, lambda kind, value, i=i: q.put((i, kind, value))) for i, (p, prm) in
            enumerate(zip(ps, params))]
    toks, finish = [[] for _ in reqs], [None] * len(reqs)
    while None in finish:
        i, kind, value = q.get(timeout=60)
        if kind == "token":
            toks[i].append(value)
        else:
            finish[i] = (kind, value)
    return toks, finish, reqs


def test_same_tokens_as_the_thread_engine(engine, folder):
    from quark.weights import load_model

    ps = prompts(6, seed=1)
    params = [SamplingParams(10 + i, 0.0, 1.0, 1.2) if i % 2 else SamplingParams(12, 0.8, 0.9, 1.1, seed=i)
              for i in range(len(ps))]  # greedy and seeded sampling, more requests than slots
    toks, finish, reqs = collect(engine, ps, params)
    local = Engine(load_model(folder), stop_ids=[CFG.vocab_size - 1], max_batch=4)
    want = run_all(local, [local.submit(p, prm) for p, prm in zip(ps, params)])
    assert toks == want
    assert all(f[0] == "done" for f in finish) and all(r.finish_reason in ("stop", "length") for r in reqs)
    load = engine.load()
    assert load["requests"] >= len(ps) and load["tokens"] >= sum(map(len, toks)) and load["active"] == 0


def test_bad_requests_fail_in_the_parent(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams(4), lambda *a: None)
    with pytest.raises(ValueError, match="context length"):
        engine.submit([1] * CFG.context_length, SamplingParams(4), lambda *a: None)
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1, 2], SamplingParams(4, temperature=-1.0), lambda *a: None)


def test_cancel_frees_the_slot(engine, folder):
    """A running request, cancelled: it ends "cancelled" and its row is freed. It is greedy and its reply (checked
    against quark.generate) holds no stop token, so it cannot end on its own before its ~125 tokens (it once
    sampled <|im_end|> first); the cancel goes out as soon as the first token has arrived, so the worker is a few
    tokens further on, not 125."""
    from quark.generate import generate
    from quark.weights import load_model

    prompt, n = [5, 6, 7], CFG.context_length - 3
    assert CFG.vocab_size - 1 not in generate(load_model(folder), [prompt], n, temperature=0.0)[0]
    q = queue.SimpleQueue()
    req = engine.submit(prompt, SamplingParams(n, 0.0, 1.0, 1.0), lambda kind, value: q.put((kind, value)))
    event = q.get(timeout=60)
    assert event[0] == "token"  # the request is running: the state the cancel must meet
    engine.cancel(req)  # from this thread: a callback that waited for `req` could stall the event reader
    tokens = 1
    while (event := q.get(timeout=60))[0] == "token":
        tokens += 1
    assert event == ("done", "cancelled") and req.finish_reason == "cancelled" and 1 <= tokens < n
    deadline = time.monotonic() + 10
    while engine.load()["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load()["active"] == 0


def reaped(pid: int) -> bool:
    """True once `pid` is gone for good: not running, and not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "X"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_dead_worker_past_its_restart_budget_fails_requests_and_later_submits(folder, caplog):
    e = ProcessEngine(folder, "cpu", stop_ids=[], max_batch=2, max_restarts=0).start()
    gave_up = threading.Event()
    e.on_failed.append(gave_up.set)
    q = queue.SimpleQueue()
    e.submit([5, 6], SamplingParams(CFG.context_length - 2, 0.7, 1.0, 1.0), lambda k, v: q.put((k, v)))
    assert q.get(timeout=60)[0] == "token"
    pid = e.proc.pid
    os.kill(pid, signal.SIGKILL)
    while (event := q.get(timeout=30))[0] == "token":
        pass
    assert event == ("error", "the engine process was killed by signal 9 (SIGKILL)")
    assert gave_up.wait(10) and e.state == "failed" and reaped(pid)
    assert "giving up after 0 restart(s)" in caplog.text
    with pytest.raises(RuntimeError, match="the engine is failed: the engine process was killed by signal 9"):
        e.submit([5], SamplingParams(2), lambda *a: None)
    load = e.load()
    assert load["active"] == load["pending"] == 0 and load["tokens"] >= 1  # counters kept, no stale rows
    from quark.serve.server import ServerThread, create_app

    with ServerThread(create_app(e, _tokenizer(folder), "m")) as s:
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "failed" and h.json()["restarts"] == 0
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert r.headers["retry-after"] == "10"


def test_requests_wait_briefly_for_a_restart_then_get_503(folder):
    from quark.serve.server import ServerThread, create_app

    e = ProcessEngine(folder, "cpu", stop_ids=[], max_batch=2, max_restarts=1, backoff_s=30)
    with ServerThread(create_app(e, _tokenizer(folder), "m", restart_wait=0.5)) as s:
        os.kill(e.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while e.state != "restarting":  # the backoff (30 s) keeps it there for this test
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert 0.5 <= time.monotonic() - t0 < 5 and r.status_code == 503
        assert r.headers["retry-after"] == "1" and "the engine is restarting" in r.json()["error"]["message"]
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "restarting" and h.headers["retry-after"] == "1"
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 10  # stopping the server cuts the backoff short


def test_kill_the_worker_under_load(folder, caplog):
    """SIGKILL the worker while four clients run requests back to back. The requests in flight
    fail at once with the real cause, /health says "restarting" (503, no stale rows), the worker is reaped and
    restarted, requests that arrive meanwhile wait for it, and service resumes."""
    from quark.serve.server import ServerThread, create_app

    engine = ProcessEngine(folder, "cpu", stop_ids=[CFG.vocab_size - 1], max_batch=4, max_restarts=2, backoff_s=0.1)
    app = create_app(engine, _tokenizer(folder), "m", restart_wait=60)
    results, stop = [], threading.Event()

    def client(k: int):
        body = {"messages": [{"role": "user", "content": f"hi {k}"}], "max_tokens": 100, "stream": k % 2 == 0}
        while not stop.is_set():
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            # a stream that fails carries its error event at the end (after up to 100 chunks), then [DONE]
            failed = r.status_code != 200 or '"error"' in r.text or (body["stream"] and "[DONE]" not in r.text)
            results.append((time.monotonic(), failed, r.text[-300:]))

    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=10) as probe:
        url = s.url
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        while len(results) < 8 or not probe.get("/health").json()["active"]:  # under load, a request in flight
            time.sleep(0.01)
        tokens_before, pid = probe.get("/health").json()["tokens"], engine.proc.pid
        assert probe.get("/health").json()["worker_pid"] == pid
        standby = engine._standby[0].pid  # started with the supervisor: torch imported, no model yet
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while (h := probe.get("/health")).status_code == 200:
            assert time.monotonic() - killed < 5, "/health never left 'ok'"
        seen = h.json()
        assert h.status_code == 503 and seen["status"] == "restarting" and h.headers["retry-after"] == "1"
        assert seen["active"] == seen["pending"] == 0 and seen["tokens"] >= tokens_before
        assert seen["last_exit"] == "was killed by signal 9 (SIGKILL)"
        while (h := probe.get("/health")).status_code != 200:
            assert time.monotonic() - killed < 60, "the worker was not restarted"
            time.sleep(0.05)
        back = time.monotonic()
        while not any(t > back and not failed for t, failed, _ in results):
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        final = probe.get("/health").json()
        following = engine._standby  # the next standby, launched once this one took over
    failures = [text for _, failed, text in results if failed]
    assert 1 <= len(failures) <= 4, failures  # only the requests in flight at the kill; later ones waited
    # in flight at the kill: the cause named; arriving in the instant before the supervisor noticed: told to retry
    assert all("killed by signal 9 (SIGKILL)" in text or "has just exited; it is being restarted" in text
               for text in failures), failures
    assert reaped(pid) and engine.proc.pid == standby and final["worker_pid"] == standby
    assert following is not None and following[0].pid not in (pid, standby) and reaped(following[0].pid)
    assert final["status"] == "ok" and final["restarts"] == 1 and final["in_flight"] == 0
    assert f"(pid {pid}) was killed by signal 9 (SIGKILL); restarting it in 0.1 s (attempt 1 of 2)" in caplog.text
    print(f"kill under load: {len(failures)} requests failed, /health back to ok {back - killed:.1f} s after the kill")


def _tokenizer(folder):
    from quark.weights import load_tokenizer_for

    return load_tokenizer_for(folder)


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="could not load .*missing"):
        ProcessEngine(tmp_path / "missing", "cpu", stop_ids=[], start_timeout=120)


def test_quark_serve_runs_the_worker_engine(folder):
    openai = pytest.importorskip("openai")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "quark", "serve", "--model", str(folder), "--port", str(port), "--device", "cpu",
           "--log-level", "warning", "--max-batch", "4", "--max-restarts", "0"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(base + "/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "quark serve did not start"
                time.sleep(0.3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        msgs = [{"role": "user", "content": "Hello there"}]
        full = client.chat.completions.create(model="model", messages=msgs, max_tokens=12, temperature=0.0)
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="model", messages=msgs, max_tokens=12, temperature=0.0, stream=True) if c.choices]
        assert "".join(parts) == full.choices[0].message.content
        assert full.usage.completion_tokens >= 1
        health = httpx.get(base + "/health").json()
        assert health["requests"] == 2 and health["tokens"] >= 2 and health["status"] == "ok"
        os.kill(health["worker_pid"], signal.SIGKILL)  # with --max-restarts 0 the server must stop, non-zero, saying why
        out = server.communicate(timeout=60)[0]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    assert server.returncode == 2, out
    assert "quark serve: error: the engine process was killed by signal 9 (SIGKILL)" in out
