"""The engine in a worker process (`quark.serve.worker.ProcessEngine`): the same tokens as the in-thread engine,
cancellation, errors in the parent, a dead worker, and `quark serve` (whose default it is) end to end."""

import os
import queue
import socket
import subprocess
import sys
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
    e = ProcessEngine(folder, "cpu", stop_ids=[CFG.im_end_id], max_batch=4).start()
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
    local = Engine(load_model(folder), stop_ids=[CFG.im_end_id], max_batch=4)
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


def test_cancel_frees_the_slot(engine):
    q = queue.SimpleQueue()
    req = engine.submit([5, 6, 7], SamplingParams(CFG.context_length - 3, 0.7, 1.0, 1.0), lambda k, v: q.put((k, v)))
    assert q.get(timeout=60)[0] == "token"
    engine.cancel(req)
    while (event := q.get(timeout=60))[0] == "token":
        pass
    assert event == ("done", "cancelled") and req.finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while engine.load()["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load()["active"] == 0


def test_a_dead_worker_fails_requests_and_later_submits(folder):
    e = ProcessEngine(folder, "cpu", stop_ids=[], max_batch=2).start()
    q = queue.SimpleQueue()
    e.submit([5, 6], SamplingParams(CFG.context_length - 2, 0.7, 1.0, 1.0), lambda k, v: q.put((k, v)))
    assert q.get(timeout=60)[0] == "token"
    e.proc.kill()
    while (event := q.get(timeout=30))[0] == "token":
        pass
    assert event[0] == "error" and "exited" in event[1]
    with pytest.raises(RuntimeError, match="not running"):
        e.submit([5], SamplingParams(2), lambda *a: None)
    e.stop()


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
           "--log-level", "warning", "--max-batch", "4"]
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
        assert health["requests"] == 2 and health["tokens"] >= 2
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode is not None
