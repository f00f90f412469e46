"""The serving features local-LLM clients expect (issue 35): log-probs and echo (evaluation clients), the prefix
cache, structured JSON output. Tiny test models, an in-process server."""

import json

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from quark.serve.engine import Engine  # noqa: E402
from quark.serve.server import ServerThread, create_app  # noqa: E402

from .test_serve_engine import contextual  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return contextual(3)


@pytest.fixture(scope="module")
def server(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer.stop_ids, max_batch=4)
    with ServerThread(create_app(engine, tiny_tokenizer, "t", max_tokens_limit=32)) as s:
        yield s


def post(server, path, body, status=200):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json() if not body.get("stream") else r.text


def reference_logprobs(model, ids):
    with torch.no_grad():
        lp = model(torch.tensor([ids])).float().log_softmax(-1)[0]
    return lp


# ---- log-probs -------------------------------------------------------------------------------------------------
def test_echo_scores_the_prompt_as_a_full_forward(server, model, tiny_tokenizer):
    """lm-eval's scoring request (echo, logprobs=1, max_tokens=1, token ids, a batch of prompts): every prompt
    token's log-prob (the first null), its top-1, then the one generated token's; text is the prompt + reply."""
    a = tiny_tokenizer.encode("def add(a, b): return a + b")
    b = a[:4]
    out = post(server, "/v1/completions", {"prompt": [a, b], "max_tokens": 1, "echo": True, "logprobs": 1,
                                           "temperature": 0})
    for ids, choice in zip((a, b), out["choices"]):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None
        ref = reference_logprobs(model, ids)
        got = torch.tensor(lp["token_logprobs"][1:len(ids)])
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for i, top in enumerate(lp["top_logprobs"][1:len(ids)]):
            assert list(top.values()) == pytest.approx([float(ref[i].max())], abs=1e-5)
        greedy = int(ref[-1].argmax())  # the generated token: greedy, its log-prob the best one
        assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1, greedy]), abs=1e-5)
        assert choice["text"].startswith(tiny_tokenizer.decode(ids))
        assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])


def test_max_tokens_zero_with_echo_and_without(server, tiny_tokenizer):
    out = post(server, "/v1/completions", {"prompt": "def f(x):", "max_tokens": 0, "echo": True, "logprobs": 2})
    c = out["choices"][0]
    ids = tiny_tokenizer.encode("def f(x):")
    assert c["text"] == "def f(x):" and c["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 0
    assert len(c["logprobs"]["tokens"]) == len(ids) and all(len(t) == 2 for t in c["logprobs"]["top_logprobs"][1:])
    err = post(server, "/v1/completions", {"prompt": "def f(x):", "max_tokens": 0}, 400)["error"]
    assert err["param"] == "max_tokens" and "echo" in err["message"]
    err = post(server, "/v1/completions", {"prompt": "x", "logprobs": 21}, 400)["error"]
    assert err["param"] == "logprobs" and "[0, 20]" in err["message"]


def test_chat_logprobs_whole_and_streamed(server, model, tiny_tokenizer):
    """The chat API's logprobs/top_logprobs: one entry per content token (greedy: the token is the top one), the
    same entries whether streamed or not."""
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "temperature": 0,
            "repetition_penalty": 1.0, "logprobs": True, "top_logprobs": 3}
    whole = post(server, "/v1/chat/completions", body)["choices"][0]
    content = whole["logprobs"]["content"]
    assert 1 <= len(content) <= 6
    assert b"".join(bytes(c["bytes"]) for c in content).decode("utf-8", "replace") == whole["message"]["content"]
    for c in content:
        assert len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["bytes"] == c["bytes"]
        assert c["top_logprobs"][0]["logprob"] == c["logprob"]
    streamed = []
    for line in post(server, "/v1/chat/completions", {**body, "stream": True}).splitlines():
        if line.startswith("data: {"):
            lp = json.loads(line[6:])["choices"][0]["logprobs"]
            streamed += lp["content"] if lp else []
    assert streamed == content
    plain = post(server, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None
