"""The serving features local-LLM clients expect (issue 35): log-probs and echo (evaluation clients), the prefix
cache, structured JSON output. Tiny test models, an in-process server."""

import json

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from quark.serve.engine import Engine, SamplingParams  # noqa: E402
from quark.serve.server import ServerThread, create_app  # noqa: E402

from .test_serve_engine import contextual  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return contextual(3)


@pytest.fixture(scope="module")
def server(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer.stop_ids, max_batch=4)
    with ServerThread(create_app(engine, tiny_tokenizer, "t", max_tokens_limit=64)) as s:
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
    assert [c["bytes"] for c in streamed] == [c["bytes"] for c in content]  # the second run reuses the prefix:
    for a, b in zip(streamed, content):  # its figures may differ in the last bits
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
        assert [t["bytes"] for t in a["top_logprobs"]] == [t["bytes"] for t in b["top_logprobs"]]
    plain = post(server, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


# ---- prefix cache ----------------------------------------------------------------------------------------------
def shared_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts that share prefixes of many lengths (whole blocks, parts of blocks, one token, none), as chat
    turns and shared system prompts do; some repeat exactly."""
    import random

    rng = random.Random(seed)
    base = [rng.randrange(1, 500) for _ in range(80)]
    cuts = [(80, 4), (40, 7), (80, 30), (17, 1), (33, 0), (80, 0), (5, 3), (64, 2), (16, 0), (48, 20), (80, 4)]
    return [base[:n] + [rng.randrange(1, 500) for _ in range(k)] for n, k in cuts]


def greedy_outputs(model, prompts, max_batch, prefix_cache_mb, stagger=False):
    """Greedy replies of an engine; `stagger` submits each prompt after the one before has finished (so every
    lookup can find the earlier ones), else all at once (admitted together, within a batch)."""
    from quark.serve.engine import SamplingParams

    e = Engine(model, [0], max_batch=max_batch, prefix_cache_mb=prefix_cache_mb, seed=0)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, rep_penalty=1.0)
    if stagger:
        return [list(e.iter_tokens(e.submit(p, params))) for p in prompts], e
    reqs = [e.submit(p, params) for p in prompts]
    return [list(e.iter_tokens(r)) for r in reqs], e


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_prefix_cache_keeps_greedy_outputs(model, max_batch):
    """The same greedy tokens with and without the prefix cache, at several batch sizes (so reused prefixes land
    in different rows and slots), staggered and all at once, and under a budget of a few blocks (evictions)."""
    prompts = shared_prompts()
    ref, _ = greedy_outputs(model, prompts, max_batch, 0)
    block_mb = model.config.n_layers * 2 * model.config.n_kv_heads * 16 * model.config.head_dim * 4 / 2**20
    for mb, stagger in ((64, False), (64, True), (3 * block_mb, True)):
        out, e = greedy_outputs(model, prompts, max_batch, mb, stagger)
        assert out == ref, (mb, stagger)
        stats = e.load()["prefix_cache"]
        assert stats["hits"] > 0 and stats["hit_tokens"] >= 16
        if mb < 1:
            assert stats["evicted_blocks"] > 0 and stats["blocks"] <= 3


def test_prefix_cache_reuses_within_a_batch(model):
    """n choices of one long prompt, submitted together: the first is prefilled, the others wait one step and
    reuse its blocks."""
    prompt = shared_prompts()[2]
    out, e = greedy_outputs(model, [prompt] * 4, 4, 64)
    assert all(o == out[0] for o in out)
    stats = e.load()["prefix_cache"]
    assert stats["hits"] == 3 and stats["hit_tokens"] == 3 * ((len(prompt) - 1) // 16) * 16


def test_prefix_cache_lru_and_exact_match():
    """Evicts least recently used leaves first; a lookup checks every block's tokens and parent, never only a
    hash; the prompt's last token is always left to compute."""
    from quark.config import QuarkConfig
    from quark.model import KVCache
    from quark.serve.prefix_cache import BLOCK, PrefixCache

    cfg = QuarkConfig.from_name("test")
    cache = KVCache(cfg, 2, 128)
    for t in cache.k + cache.v:
        t.normal_()
    pc = PrefixCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"), 0)
    pc.capacity = 4
    a = list(range(1, 3 * BLOCK + 1))
    pc.insert(a, cache, 0)
    assert pc.match(a) == PrefixCache.keys(a)[:2]  # the last block would leave no token to compute
    assert pc.match(a + [7]) == PrefixCache.keys(a)
    b = a[:BLOCK] + [999] * 2 * BLOCK  # shares the first block: two new ones, one leaf of `a` evicted
    pc.insert(b, cache, 1)
    assert pc.counts["evicted_blocks"] == 1 and len(pc.match(a + [7])) == 2 and len(pc.match(b + [7])) == 3
    copy = KVCache(cfg, 1, 128)
    pc.copy_in(pc.match(b + [7]), copy, 0)
    for src, dst in zip(cache.k + cache.v, copy.k + copy.v):
        assert torch.equal(dst[0, :, :BLOCK], src[0, :, :BLOCK]) and torch.equal(dst[0, :, BLOCK:48], src[1, :, BLOCK:48])
    key = PrefixCache.keys(b)[1]
    parent, toks, kv = pc.blocks[key]
    pc.blocks[key] = (parent, (5,) * BLOCK, kv)  # as if another prefix hashed alike: not handed out
    assert len(pc.match(b + [7])) == 1


# ---- structured output -----------------------------------------------------------------------------------------
BOUNDED = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 9},
                                             "color": {"enum": ["red", "green", "blue"]}},
           "required": ["ok", "n", "color"]}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schema_output_parses_and_validates(server, temperature):
    """A random model, constrained: every reply is the schema's JSON (bounded, so it always ends), ended by the
    stop token the grammar forces; on both endpoints, n choices and a stream alike."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": BOUNDED}}
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60,
                                                 "n": 3, "temperature": temperature, "response_format": fmt})
    comp = post(server, "/v1/completions", {"prompt": "Colors:", "max_tokens": 60, "temperature": temperature,
                                            "response_format": fmt})
    texts = [c["message"]["content"] for c in chat["choices"]] + [comp["choices"][0]["text"]]
    assert all(c["finish_reason"] == "stop" for c in chat["choices"] + comp["choices"])
    stream = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Yo"}], "max_tokens": 60,
                                                   "temperature": temperature, "response_format": fmt, "stream": True})
    texts.append("".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                         for line in stream.splitlines() if line.startswith("data: {")))
    for t in texts:
        jsonschema.validate(json.loads(t), BOUNDED)


def test_json_object_and_invalid_formats(server, tiny_tokenizer):
    pytest.importorskip("xgrammar")
    out = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24,
                                                "temperature": 0, "response_format": {"type": "json_object"}})
    text = out["choices"][0]["message"]["content"]
    assert text.startswith("{")
    if out["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    for fmt, words in (({"type": "xml"}, "json_object"), ({"type": "json_schema"}, "'schema'"),
                       ({"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}, "not valid JSON Schema"),
                       ({"type": "json_schema", "json_schema": {"schema": {"minimum": "zero"}}}, "minimum"),
                       ("json", "must be")):
        err = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "response_format": fmt}, 400)["error"]
        assert err["param"] == "response_format" and err["code"] == "invalid_response_format", err
        assert words in err["message"], err


def test_llm_chat_response_format(model, tiny_tokenizer):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    from quark.llm import LLM

    llm = LLM(model, tiny_tokenizer)
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": BOUNDED}}
    for reply in llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                          response_format=fmt, max_new_tokens=60, temperature=0.9):
        jsonschema.validate(json.loads(reply), BOUNDED)
    with pytest.raises(ValueError, match="response_format"):
        llm.chat([{"role": "user", "content": "a"}], response_format={"type": "yaml"})


def test_kv_cache_budget_cuts_the_context_per_sequence(model):
    """The preallocated cache fits --kv-cache-mb: SmolLM2's 8,192-token context at 32 rows (12 GB in fp32) is cut
    to what 4 GB holds; a prompt beyond the cut is refused, one within it runs."""
    from quark.config import QuarkConfig
    from quark.serve.engine import kv_context

    smol = QuarkConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                       context_length=8192)
    assert kv_context(smol, 32, None, 4096, 4) == 2880  # 46,080 bytes a token: 4 GiB / 32 rows, to 64
    assert kv_context(smol, 1, None, 4096, 4) == 8192 and kv_context(smol, 1, 1000, 4096, 4) == 1000
    assert kv_context(QuarkConfig.from_name("quark-72m"), 32, None, 4096, 4) == 2048  # fits: unchanged
    with pytest.raises(ValueError, match="raise the KV cache budget"):
        kv_context(smol, 32, None, 10, 4)
    c = model.config
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4
    eng = Engine(model, [], max_batch=4, kv_cache_mb=4 * 64 * per_token / 2**20, prefix_cache_mb=0)
    assert eng.context_length == 64 < c.context_length and eng.hist.shape[1] == 65
    with pytest.raises(ValueError, match="context"):
        eng.submit(list(range(5, 65)), SamplingParams(16, 0.0, 1.0, 1.0))
    req = eng.submit(list(range(5, 45)), SamplingParams(16, 0.0, 1.0, 1.0))
    assert len(list(eng.iter_tokens(req))) == 16


def test_repetition_penalty_spares_the_json_delimiters(model, tiny_tokenizer):
    """A JSON reply repeats its quotes, commas and braces; penalizing them kept SmolLM2's strings from closing. The
    penalty spares delimiter tokens in rows with a grammar and only there: greedy sampling with a huge penalty."""
    pytest.importorskip("xgrammar")
    from types import SimpleNamespace

    eng = Engine(model, [], max_batch=2, tokenizer=tiny_tokenizer, prefix_cache_mb=0)
    quote, letter = tiny_tokenizer.encode('"')[0], tiny_tokenizer.encode("a")[0]
    structural = eng._grammar().structural
    assert structural[quote] and not structural[letter]
    rows = [SimpleNamespace(matcher=object(), generator=None, length=3, req=SimpleNamespace(params=p))
            for p in [SamplingParams(8, 0.0, 1.0, 100.0)] * 2]
    rows[1].matcher = None
    eng.seen[:2] = False
    eng.seen[:2, [quote, letter]] = True
    logits = torch.full((2, model.config.vocab_size), -5.0)
    logits[:, quote], logits[:, letter] = 4.0, 3.0  # seen, so penalized /100: a fresh token at 1.0 wins
    logits[:, letter + 1] = 1.0
    assert eng._sample_group(logits, rows, slice(0, 2)).tolist() == [quote, letter + 1]

