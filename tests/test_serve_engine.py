"""The continuous-batching engine against `quark.generate` (the independent one-prompt-at-a-time reference), plus
the incremental decoder and stop-string matcher."""

import time

import pytest
import torch

from quark.config import QuarkConfig
from quark.fast import FastDecoder
from quark.generate import Decoder
from quark.generate import generate as _generate
from quark.model import Quark
from quark.serve.engine import Engine, SamplingParams
from quark.serve.text import IncrementalDecoder, StopMatcher

CFG = QuarkConfig.from_name("test")


def contextual(seed: int) -> Quark:
    """A random model whose next token depends on the context. At init, attention is nearly uniform and small
    next to the residual, and a tied head mostly predicts the input token again, so greedy output would
    barely depend on the cache and a cache bug could pass unseen. Untied, with peaked, stronger attention,
    changing one prompt token changes the continuation."""
    model = Quark(CFG.replace(tie_embeddings=False)).init_weights(seed).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for name, scale in (("q_proj", 8), ("k_proj", 8), ("v_proj", 6), ("o_proj", 6)):
                getattr(layer.self_attn, name).weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def model():
    return contextual(0)


def generate(*a, **kw):
    """The reference: quark.generate on the plain path (Quark.forward + KVCache), one prompt at a time."""
    return _generate(*a, fast=False, **kw)


def make_engine(model, fast: bool, monkeypatch, **kw) -> Engine:
    """An engine on the fast decoder (fused weights, per-row step), or on the reference Decoder (QUARK_FAST=0)."""
    if not fast:
        monkeypatch.setenv("QUARK_FAST", "0")
    engine = Engine(model, **kw)
    monkeypatch.delenv("QUARK_FAST", raising=False)
    assert type(engine.dec) is (FastDecoder if fast else Decoder)
    return engine


def run_all(engine, reqs):
    while any(r.finish_reason is None for r in reqs):
        engine.step()
    outs = []
    for r in reqs:
        toks = []
        while not r.events.empty():
            kind, value = r.events.get()
            if kind == "token":
                toks.append(value)
        outs.append(toks)
    return outs


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(L),), generator=g).tolist() for L in torch.randint(2, 40, (n,), generator=g)]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("rep", [1.0, 1.3])
def test_batched_greedy_matches_one_at_a_time(model, rep, fast, monkeypatch):
    ps = prompts(7)
    # fewer slots than requests: rows get reused
    engine = make_engine(model, fast, monkeypatch, stop_ids=[CFG.vocab_size - 1], max_batch=3)
    reqs = [engine.submit(p, SamplingParams(12 + i, 0.0, 1.0, rep)) for i, p in enumerate(ps)]
    outs = run_all(engine, reqs)
    for i, (p, out, r) in enumerate(zip(ps, outs, reqs)):
        ref = generate(model, [p], 12 + i, temperature=0.0, rep_penalty=rep)[0]
        assert out == ref, f"request {i}"
        assert r.finish_reason == "length"
    assert engine.stats["peak_batch"] == 3 and engine.load()["active"] == 0


@pytest.mark.parametrize("fast", [True, False])
def test_requests_joining_mid_decode_match_reference(model, fast, monkeypatch):
    ps = prompts(4, seed=1)
    engine = make_engine(model, fast, monkeypatch, stop_ids=[], max_batch=4)
    first = engine.submit(ps[0], SamplingParams(30, 0.0, 1.0, 1.0))
    for _ in range(5):
        engine.step()
    late = [engine.submit(p, SamplingParams(10, 0.0, 1.0, 1.0)) for p in ps[1:]]
    outs = run_all(engine, [first] + late)
    for p, out, n in zip(ps, outs, [30, 10, 10, 10]):
        assert out == generate(model, [p], n, temperature=0.0)[0]


@pytest.mark.parametrize("fast", [True, False])
def test_seeded_sampling_is_independent_of_the_batch(model, fast, monkeypatch):
    ps = prompts(3, seed=2)
    engine = make_engine(model, fast, monkeypatch, stop_ids=[], max_batch=8)
    seeded = engine.submit(ps[0], SamplingParams(15, 0.9, 0.95, 1.1, seed=123))
    others = [engine.submit(p, SamplingParams(15, 1.0, 1.0, 1.0)) for p in ps[1:]]  # different params, same batch
    greedy = engine.submit(ps[1], SamplingParams(15, 0.0, 1.0, 1.0))
    outs = run_all(engine, [seeded, *others, greedy])
    assert outs[0] == generate(model, [ps[0]], 15, temperature=0.9, top_p=0.95, rep_penalty=1.1, seed=123)[0]
    assert outs[-1] == generate(model, [ps[1]], 15, temperature=0.0)[0]


def test_stop_token_ends_the_reply_and_is_not_sent(model):
    p = prompts(1, seed=3)[0]
    ref = generate(model, [p], 10, temperature=0.0)[0]
    stop = ref[4]
    engine = Engine(model, stop_ids=[stop], max_batch=2)
    req = engine.submit(p, SamplingParams(10, 0.0, 1.0, 1.0))
    out = run_all(engine, [req])[0]
    assert out == ref[:ref.index(stop)] and req.finish_reason == "stop"


def test_cancel_frees_the_slot_at_the_next_step(model):
    engine = Engine(model, stop_ids=[], max_batch=2)
    a = engine.submit([1, 2, 3], SamplingParams(100, 0.5, 0.9, 1.0))
    b = engine.submit([4, 5], SamplingParams(100, 0.5, 0.9, 1.0))
    engine.step()
    assert engine.load()["active"] == 2
    engine.cancel(a)
    engine.step()
    assert engine.load()["active"] == 1 and a.finish_reason == "cancelled" and b.finish_reason is None
    c = engine.submit([6], SamplingParams(3, 0.0, 1.0, 1.0))
    run_all(engine, [c])
    assert c.finish_reason == "length"


def test_submit_rejects_bad_work(model):
    engine = Engine(model, stop_ids=[], max_batch=1)
    with pytest.raises(ValueError, match="context length"):
        engine.submit([1] * 100, SamplingParams(29, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams(5))
    with pytest.raises(ValueError, match="vocabulary|token ids"):
        engine.submit([CFG.vocab_size], SamplingParams(5))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([1], SamplingParams(5, top_p=0.0))


class SlowQuark(Quark):
    """A model whose every forward takes >= 10 ms, like a bigger model would."""

    def hidden(self, *a, **kw):
        time.sleep(0.01)
        return super().hidden(*a, **kw)


def test_thread_batches_concurrent_requests():
    model = SlowQuark(CFG).init_weights(0).eval()
    engine = Engine(model, stop_ids=[], max_batch=8).start()
    try:
        t0 = time.perf_counter()
        reqs = [engine.submit([i + 1, 7], SamplingParams(20, 0.7, 0.9, 1.0)) for i in range(8)]
        outs = [list(engine.iter_tokens(r)) for r in reqs]
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    assert all(len(o) == 20 for o in outs)
    # served one at a time this would be 8 x 20 decode steps; batched it is about 20
    assert engine.stats["steps"] <= 40 and engine.stats["peak_batch"] >= 6, engine.stats
    assert wall < 8 * 20 * 0.01


def test_incremental_decoder_never_splits_characters(tiny_tokenizer):
    text = "Però è già così: 😀 città €5 — ok"
    ids = tiny_tokenizer.encode(text)
    dec, pieces = IncrementalDecoder(tiny_tokenizer), []
    for t in ids:
        pieces.append(dec.push(t))
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it streamed, not one piece at the end


def test_stop_matcher_holds_back_possible_stops():
    m = StopMatcher(["STOP", "\n\n"])
    shown = [m.push(c) for c in "say ST then STOP and more"]
    assert "".join(shown) == "say ST then " and m.stopped
    m = StopMatcher(["END"])
    assert m.push("abcE") == "abc" and m.push("N") == "" and m.push("x") == "ENx"
    assert m.push("tail E") == "tail " and m.flush() == "E"


def test_int8_model_runs_in_the_engine():
    quantize = pytest.importorskip("quark.quantize")
    m = quantize.quantize_int8(Quark(CFG).init_weights(4).eval())
    ps = prompts(3, seed=5)
    engine = Engine(m, stop_ids=[], max_batch=4)
    outs = run_all(engine, [engine.submit(p, SamplingParams(8, 0.0, 1.0, 1.3)) for p in ps])
    assert outs == [generate(m, [p], 8, temperature=0.0, rep_penalty=1.3)[0] for p in ps]


def test_nucleus_sample_matches_sample_next_distribution():
    from quark.sampling import apply_rep_penalty, nucleus_sample, rep_penalty_ids, top_p_filter

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 2
    seen = torch.rand(3, 50, generator=g) < 0.3
    ids = [r.nonzero().squeeze(-1).tolist() for r in seen]
    width = max(len(r) for r in ids) + 3
    ids = torch.tensor([r + [r[0]] * (width - len(r)) for r in ids])  # padded with repeats, as the engine does
    assert torch.equal(rep_penalty_ids(logits, ids, 1.3), apply_rep_penalty(logits, seen, 1.3))
    draws = 20000
    # top_p 0.15 on flat logits rejects most full-distribution draws: that exercises the masked fallback
    for scale, temperature, top_p in ((1.0, 0.8, 0.7), (0.25, 1.0, 0.15), (1.0, 1.3, 1.0)):
        want = top_p_filter(logits * scale / temperature, top_p).softmax(-1)  # sample_next's distribution
        big = (logits * scale).repeat_interleave(draws, 0)
        toks = nucleus_sample(big, temperature, top_p, torch.Generator().manual_seed(1)).view(3, draws)
        for r in range(3):
            freq = torch.bincount(toks[r], minlength=50).float() / draws
            assert torch.equal(freq > 0, want[r] > 0), f"the kept (top-p) set differs (top_p={top_p})"
            assert (freq - want[r]).abs().max() < 0.015
    bad = logits.clone()
    bad[1, 3] = float("nan")  # a non-finite row falls back to greedy over its finite entries, as in sample_next
    assert nucleus_sample(bad, temperature, top_p)[1] == torch.nan_to_num(bad[1], nan=float("-inf")).argmax()
    assert torch.equal(nucleus_sample(logits, 0.0, top_p), logits.argmax(-1))


def test_history_used_by_the_penalty_matches_the_seen_tokens(model):
    engine = Engine(model, stop_ids=[], max_batch=3)
    reqs = [engine.submit(p, SamplingParams(6 + 3 * i, 0.9, 0.9, 1.3)) for i, p in enumerate(prompts(6, seed=9))]
    while any(r.finish_reason is None for r in reqs):
        engine.step()
        for i, row in enumerate(engine.rows):
            hist = set(engine.hist[i, :row.length + 1].tolist())
            assert hist == set(engine.seen[i].nonzero().squeeze(-1).tolist()), f"row {i}"
    assert engine.stats["requests"] == 6


@pytest.mark.parametrize("fast", [True, False])
def test_a_row_moved_into_a_freed_slot_keeps_its_cache(model, fast, monkeypatch):
    short, long_ = prompts(2, seed=11)
    engine = make_engine(model, fast, monkeypatch, stop_ids=[], max_batch=2)
    a = engine.submit(short, SamplingParams(2, 0.0, 1.0, 1.3))
    b = engine.submit(long_, SamplingParams(40, 0.0, 1.0, 1.3))  # moves from row 1 to row 0 when `a` ends
    outs = run_all(engine, [a, b])
    ref = generate(model, [long_], 40, temperature=0.0, rep_penalty=1.3)[0]
    assert outs[1] == ref and len(set(ref)) > 10  # a varied continuation: it really reads the cache
    other = generate(model, [[(long_[0] + 1) % 512] + long_[1:]], 40, temperature=0.0, rep_penalty=1.3)[0]
    assert other != ref  # the model is context-sensitive, so a stale cache would show


@pytest.mark.gpu
def test_engine_on_cuda_decodes_through_the_captured_graph(model):
    """On CUDA the engine's rows run through the fast decoder's CUDA-graph step (#9) and give the plain path's
    greedy tokens, with rows joining, leaving and moving."""
    import copy

    m = copy.deepcopy(model).cuda()
    engine = Engine(m, stop_ids=[], max_batch=3)
    assert isinstance(engine.dec, FastDecoder) and engine.dec.use_graph
    ps = prompts(6, seed=5)
    reqs = [engine.submit(p, SamplingParams(8 + 2 * i, 0.0, 1.0, 1.3)) for i, p in enumerate(ps)]
    outs = run_all(engine, reqs)
    for i, (p, out) in enumerate(zip(ps, outs)):
        assert out == generate(m, [p], 8 + 2 * i, temperature=0.0, rep_penalty=1.3)[0], f"request {i}"
    assert engine.dec.graph not in (None, False)


def test_arrivals_during_decode_are_admitted_in_groups(model):
    engine = Engine(model, stop_ids=[], max_batch=8, admit_batch=3, admit_wait_steps=2)
    first = engine.submit([1, 2, 3], SamplingParams(40, 0.0, 1.0, 1.0))
    engine.step()
    assert engine.load()["active"] == 1  # an idle engine admits at once
    lone = engine.submit([4, 5], SamplingParams(5, 0.0, 1.0, 1.0))
    engine.step(), engine.step()
    assert engine.load()["active"] == 1 and engine.load()["pending"] == 1  # waits for company...
    engine.step()
    assert engine.load()["active"] == 2  # ...for at most admit_wait_steps decode steps
    group = [engine.submit([6 + i], SamplingParams(5, 0.0, 1.0, 1.0)) for i in range(3)]
    engine.step()
    assert engine.load()["active"] == 5  # admit_batch arrivals join together, at once
    outs = run_all(engine, [first, lone, *group])
    assert outs[1] == generate(model, [[4, 5]], 5, temperature=0.0)[0]
