"""The OpenAI-compatible server, end to end: a real uvicorn server on a free loopback port, driven by the official
`openai` client (streaming and not) and by raw httpx for bad input; greedy replies are checked against
`quark.generate` on the same model."""

import json
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from quark.config import QuarkConfig  # noqa: E402
from quark.generate import generate  # noqa: E402
from quark.model import Quark  # noqa: E402
from quark.serve.engine import Engine  # noqa: E402
from quark.serve.server import ServerThread, create_app  # noqa: E402
from quark.weights import save_model  # noqa: E402

from .test_serve_engine import contextual  # noqa: E402

CFG = QuarkConfig.from_name("test")
KEY = "sk-test-secret-123"
HELLO = [{"role": "user", "content": "Hello! How are you?"}]


class SlowQuark(Quark):
    def hidden(self, *a, **kw):
        time.sleep(0.01)
        return super().hidden(*a, **kw)


@pytest.fixture(scope="module")
def model():
    return contextual(1)  # replies that depend on the conversation


@pytest.fixture(scope="module")
def server(model, tiny_tokenizer):
    engine = Engine(model, [tiny_tokenizer.im_end_id, tiny_tokenizer.eot_id], max_batch=8)
    app = create_app(engine, tiny_tokenizer, "quark-test", max_tokens_limit=64)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def slow_server(tiny_tokenizer):
    """API key required; every forward takes 10 ms so streams last long enough to disconnect from."""
    m = SlowQuark(CFG).init_weights(2).eval()
    engine = Engine(m, [tiny_tokenizer.im_end_id, tiny_tokenizer.eot_id], max_batch=4)
    with ServerThread(create_app(engine, tiny_tokenizer, "slow", api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy_reference(model, tok, messages, n):
    """(text, tokens, finish_reason) of the greedy reply; <|im_end|> and <|endoftext|> both end a reply."""
    ids = generate(model, [tok.render_prompt(messages)], n, temperature=0.0, rep_penalty=1.0)[0]
    cut = next((i for i, t in enumerate(ids) if t in (tok.im_end_id, tok.eot_id)), None)
    if cut is None:
        return tok.decode(ids), len(ids), "length"
    return tok.decode(ids[:cut]), cut, "stop"


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["quark-test"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["max_batch"] == 8 and h["context_length"] == CFG.context_length


def test_chat_greedy_matches_generate(client, model, tiny_tokenizer):
    r = client.chat.completions.create(model="quark-test", messages=HELLO, max_tokens=20, temperature=0,
                                       extra_body={"repetition_penalty": 1.0})
    text, n, finish = greedy_reference(model, tiny_tokenizer, HELLO, 20)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == text and c.finish_reason == finish
    assert r.usage.prompt_tokens == len(tiny_tokenizer.render_prompt(HELLO))
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n
    other = [{"role": "user", "content": "Something else entirely"}]
    assert greedy_reference(model, tiny_tokenizer, other, 20)[0] != text  # the reply depends on the prompt


def test_chat_stream_equals_non_stream_with_seed(client):
    kw = {"model": "quark-test", "messages": HELLO, "max_tokens": 25, "temperature": 0.8, "seed": 7}
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == full.choices[0].message.content and finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_choices_and_raw_sse_ends_with_done(server):
    body = {"model": "quark-test", "messages": HELLO, "max_tokens": 8, "n": 3, "seed": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    done = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
            for c in chunks if c["choices"][0]["finish_reason"]}
    assert sorted(done) == [0, 1, 2] and set(done.values()) <= {"stop", "length"}


def test_completions_prompts_stop_and_caps(client, model, tiny_tokenizer):
    r = client.completions.create(model="quark-test", prompt=["def f(x):", "import os"], max_tokens=10, n=2,
                                  temperature=0, extra_body={"repetition_penalty": 1.0})
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    ref = tiny_tokenizer.decode(generate(model, [tiny_tokenizer.encode("import os")], 10, temperature=0.0)[0])
    assert r.choices[2].text == ref == r.choices[3].text
    # a stop string cuts the text before it and ends with finish_reason "stop"
    stop = ref[3:5]
    s = client.completions.create(model="quark-test", prompt="import os", max_tokens=10, temperature=0, stop=[stop],
                                  extra_body={"repetition_penalty": 1.0})
    assert s.choices[0].text == ref[:ref.index(stop)] and s.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="quark-test", prompt="import os", max_tokens=10, temperature=0,
                                         stop=stop, stream=True, extra_body={"repetition_penalty": 1.0})
    assert "".join(c.choices[0].text for c in streamed) == s.choices[0].text
    # max_tokens is capped by the server-wide limit (64) and by the room left in the 128-token context
    big = client.completions.create(model="quark-test", prompt="x", max_tokens=1000, temperature=0.9)
    assert big.usage.completion_tokens <= 64
    long_prompt = [5] * 100
    near = client.completions.create(model="quark-test", prompt=long_prompt, max_tokens=60, temperature=1.0,
                                     extra_body={"repetition_penalty": 1.0})
    assert near.usage.completion_tokens <= CFG.context_length - 100
    if near.choices[0].finish_reason == "length":
        assert near.usage.completion_tokens == CFG.context_length - 100


def test_prompt_over_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="quark-test", messages=[{"role": "user", "content": "word " * 300}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert e.value.body["code"] == "model_not_found"


BAD_BODIES = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (json.dumps({"messages": HELLO, "temperature": "hot"}), 400),
    (json.dumps({"messages": HELLO, "temperature": -0.1}), 400),
    (json.dumps({"messages": HELLO, "temperature": 2.5}), 400),
    (json.dumps({"messages": HELLO, "top_p": 0}), 400),
    (json.dumps({"messages": HELLO, "top_p": 1.5}), 400),
    (json.dumps({"messages": HELLO, "max_tokens": -5}), 400),
    (json.dumps({"messages": HELLO, "max_tokens": 2.5}), 400),
    (json.dumps({"messages": HELLO, "n": 0}), 400),
    (json.dumps({"messages": HELLO, "stream": "yes"}), 400),
    (json.dumps({"messages": HELLO, "stop": [1, 2]}), 400),
    (json.dumps({"messages": HELLO, "seed": "abc"}), 400),
    (json.dumps({"messages": HELLO, "repetition_penalty": 0}), 400),
    (json.dumps({"messages": []}), 400),
    (json.dumps({"messages": "hi"}), 400),
    (json.dumps({}), 400),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), 400),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}), 400),
    (json.dumps({"messages": [{"role": "user"}]}), 400),
    (json.dumps({"messages": HELLO, "model": 3}), 400),
    (json.dumps({"messages": HELLO, "logprobs": 3}), 400),
    (json.dumps({"messages": HELLO, "top_logprobs": 3}), 400),
    (json.dumps({"messages": HELLO, "logprobs": True, "top_logprobs": 21}), 400),
    (json.dumps({"messages": HELLO, "echo": True}), 400),
    (json.dumps({"messages": HELLO, "max_tokens": 0}), 400),
    (json.dumps({"messages": HELLO, "tools": [{"type": "function"}]}), 400),
    (b"x" * (10 << 20), 413),
]


def test_bad_input_is_4xx_and_the_server_keeps_serving(server, client):
    # a long stream runs while bad requests arrive; it must complete normally
    result = {}

    def long_stream():
        s = client.chat.completions.create(model="quark-test", messages=HELLO, max_tokens=60, stream=True)
        result["text"] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    t = threading.Thread(target=long_stream)
    t.start()
    for body, status in BAD_BODIES:
        data = body if isinstance(body, bytes) else body.encode()
        r = httpx.post(server.url + "/v1/chat/completions", content=data, timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:80], r.text)
        err = r.json()["error"]
        assert err["type"] and err["message"], r.text
    bad_prompt = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 99999]}, timeout=30)
    assert bad_prompt.status_code == 400 and "prompt" in bad_prompt.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    t.join(timeout=60)
    assert "text" in result
    ok = client.chat.completions.create(model="quark-test", messages=HELLO, max_tokens=3)
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(server.url + "/health").json()["errors"] == 0


def test_api_key_required(slow_server):
    url = slow_server.url + "/v1"
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url, api_key=key or "x", max_retries=0,
                          default_headers={} if key else {"Authorization": ""}).models.list()
        assert e.value.status_code == 401
    r = httpx.post(url + "/chat/completions", json={"messages": HELLO})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert ok.models.list().data[0].id == "slow"
    assert httpx.get(slow_server.url + "/health").status_code == 200  # probes need no key


def test_disconnect_frees_the_slot(slow_server):
    health = slow_server.url + "/health"
    body = {"model": "slow", "messages": HELLO, "max_tokens": 100, "temperature": 0, "repetition_penalty": 1.0,
            "stream": True}
    with httpx.stream("POST", slow_server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        lines = (line for line in r.iter_lines() if line)
        assert next(lines).startswith("data: ")  # the role chunk
        assert '"content"' in next(lines)  # a token: the request is in the batch now
        assert httpx.get(health).json()["active"] == 1
    t0 = time.monotonic()
    while httpx.get(health).json()["active"] != 0:
        assert time.monotonic() - t0 < 2.0, "the slot of a disconnected stream was not freed"
        time.sleep(0.02)


def test_quark_serve_command(tmp_path, model, tiny_tokenizer, monkeypatch, capsys):
    """`quark serve` end to end in-process: uvicorn.Server.run is swapped for a ServerThread on a free port."""
    import uvicorn

    from quark.cli import build_parser, main

    folder = tmp_path / "my-model"
    save_model(model, folder)
    tiny_tokenizer.save(folder)
    seen = {}

    def fake_run(self, sockets=None):
        seen.update(host=self.config.host, port=self.config.port)
        with ServerThread(self.config.app, log_level=self.config.log_level) as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
            r = c.chat.completions.create(model="my-model", messages=HELLO, max_tokens=5)
            seen["tokens"] = r.usage.completion_tokens
            seen["page"] = httpx.get(s.url + "/").text
            seen["no_key"] = httpx.get(s.url + "/v1/models").status_code

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    # --max-restarts 0: no standby worker importing torch beside this test (tests/test_serve_worker.py tests it)
    # --port 0: `quark serve` binds the port itself, and 8000 may be taken on a shared machine
    assert main(["serve", "--model", str(folder), "--api-key", KEY, "--max-batch", "4", "--max-restarts", "0",
                 "--port", "0"]) == 0
    out = capsys.readouterr()
    assert seen["host"] == "127.0.0.1" and build_parser().parse_args(["serve", "--model", "m"]).port == 8000
    assert 1 <= seen["tokens"] <= 5 and "Quark chat" in seen["page"] and seen["no_key"] == 401
    assert "API key required" in out.out and "warning" not in out.out
    assert KEY not in out.out + out.err  # never logged
    main(["serve", "--model", str(folder), "--host", "0.0.0.0", "--port", "0", "--max-restarts", "0"])
    assert seen["host"] == "0.0.0.0" and "reachable from other machines without an API key" in capsys.readouterr().out


def test_serve_refuses_bad_args(tmp_path):
    from quark.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    with pytest.raises(ValueError, match="max_tokens_limit"):
        create_app(Engine(Quark(CFG).init_weights(0), [0], max_batch=1), None, "m", max_tokens_limit=0)
    assert torch.is_grad_enabled()  # the engine does not leak no_grad mode


def test_non_stream_client_that_leaves_frees_its_slot(slow_server):
    health = slow_server.url + "/health"
    body = {"model": "slow", "messages": HELLO, "max_tokens": 100, "temperature": 0, "repetition_penalty": 1.0}
    tokens_before = httpx.get(health).json()["tokens"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.3 s; the reply takes over 1 s
        httpx.post(slow_server.url + "/v1/chat/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {KEY}"})
    t0 = time.monotonic()
    while httpx.get(health).json()["active"] != 0:
        assert time.monotonic() - t0 < 5, "the slot of a departed non-streaming client was not freed"
        time.sleep(0.05)
    assert httpx.get(health).json()["tokens"] - tokens_before < 100  # stopped before the reply was complete
