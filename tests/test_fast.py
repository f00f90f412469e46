"""The fast decoder (quark/fast.py) against the plain model.forward + KVCache path and full-sequence logits."""

import copy
import functools

import pytest
import torch

from quark import Quark
from quark.config import PRESETS
from quark.fast import FastDecoder, FusedWeights, decoder_for, refresh
from quark.generate import generate, generate_text


def noisy_test_model() -> Quark:
    """The test preset with non-trivial norms, so a misplaced norm weight would show."""
    torch.manual_seed(0)
    m = Quark(PRESETS["test"]).init_weights(seed=5).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def model():
    return noisy_test_model()


def _decode_logits(dec, idx, key_mask=None):
    """Prefill idx[:, :P] then feed the rest one token at a time; logits for positions P-1 .. T-1."""
    P = idx.shape[1] // 2
    got = [dec.prefill(idx[:, :P], key_mask)]
    for t in range(P, idx.shape[1]):
        got.append(dec.step(idx[:, t]))
    return torch.stack(got, 1)


@pytest.mark.parametrize("static", [False, True])
def test_prefill_and_steps_match_full_forward(model, static):
    idx = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx)[:, 11:]
    dec = FastDecoder(model, FusedWeights(model), 3, 40, use_graph=static)
    got = _decode_logits(dec, idx)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("static", [False, True])
def test_left_padded_rows_match_unpadded(model, static):
    short = torch.randint(1, 500, (1, 10), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1)
    key_mask = torch.cat([torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], 1)
    dec = FastDecoder(model, FusedWeights(model), 2, 32, use_graph=static)
    both = torch.cat([padded, torch.randint(1, 500, (1, 16))])
    mask = torch.cat([key_mask, torch.ones(1, 16, dtype=torch.bool)])
    l0 = dec.prefill(both[:, :12], mask)
    steps = [dec.step(both[:, t]) for t in range(12, 16)]
    with torch.no_grad():
        ref = model(short)  # the unpadded row alone
    assert (l0[0] - ref[0, 5]).abs().max().item() <= 1e-4
    for j, s in enumerate(steps):
        assert (s[0] - ref[0, 6 + j]).abs().max().item() <= 1e-4


def test_greedy_tokens_equal_plain_path(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [100, 200, 300]]
    fast = generate(model, prompts, max_new_tokens=20, temperature=0.0, fast=True)
    plain = generate(model, prompts, max_new_tokens=20, temperature=0.0, fast=False)
    assert fast == plain
    pen_f = generate(model, [[1, 2, 3]], max_new_tokens=15, temperature=0.0, rep_penalty=1.3, fast=True)
    pen_p = generate(model, [[1, 2, 3]], max_new_tokens=15, temperature=0.0, rep_penalty=1.3, fast=False)
    assert pen_f == pen_p


def test_generate_text_uses_fast_path_by_default(model, monkeypatch):
    calls = {"n": 0}
    real = FastDecoder.step

    def counting(self, tok):
        calls["n"] += 1
        return real(self, tok)

    monkeypatch.setattr(FastDecoder, "step", counting)
    prompt = torch.tensor([[3, 4, 5, 6]])
    out = generate_text(model, prompt, max_new_tokens=6, temperature=0.0)
    assert calls["n"] == 5
    assert out.tolist() == generate_text(model, prompt, max_new_tokens=6, temperature=0.0, fast=False).tolist()


def _fast_equals_plain(m: Quark, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of the fast path, asserted equal to the plain path's."""
    fast = generate(m, prompts, max_new_tokens=10, temperature=0.0)
    assert fast == generate(m, prompts, max_new_tokens=10, temperature=0.0, fast=False)
    return fast


@pytest.mark.parametrize("prompts", [[[1, 2, 3]], [[1, 2, 3], [4, 5]]])  # one row; batched: (in, out) weights
def test_fused_weights_follow_optimizer_steps_loads_and_replacement(prompts):
    m = Quark(PRESETS["test"]).init_weights(seed=9).eval()

    def same_as_plain():
        return _fast_equals_plain(m, prompts)

    before = same_as_plain()
    opt = torch.optim.SGD(m.parameters(), lr=5.0)  # a real optimizer step, in place
    m.loss(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[7, 7, 7, 7]])).backward()
    opt.step()
    stepped = same_as_plain()
    assert stepped != before
    m.load_state_dict(Quark(PRESETS["test"]).init_weights(seed=9).state_dict())  # back to the first weights
    assert same_as_plain() == before
    with torch.no_grad():  # a hand edit is not seen until refresh()
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    refresh(m)
    assert same_as_plain() != before
    # replaced tensors (new storage) force a rebuild
    m.model.layers[0].self_attn.k_proj.weight = torch.nn.Parameter(torch.randn(32, 64) * 0.3)
    same_as_plain()


def test_nan_logits_in_fast_path_fall_back_to_greedy(model, monkeypatch):
    real = FastDecoder.step
    calls = {"n": 0}

    def poisoned(self, tok):
        out = real(self, tok)
        calls["n"] += 1
        if calls["n"] == 2:
            out[..., 10] = float("nan")
        return out

    monkeypatch.setattr(FastDecoder, "step", poisoned)
    out = generate(model, [[1, 2, 3]], max_new_tokens=6, temperature=0.8, seed=0, fast=True)[0]
    assert calls["n"] == 5 and len(out) == 6 and all(0 <= t < model.config.vocab_size for t in out)


def test_seeded_sampling_reproducible_on_fast_path(model):
    a = generate(model, [[1, 2, 3]], max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7, fast=True)
    b = generate(model, [[1, 2, 3]], max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7, fast=True)
    assert a == b


def test_decoder_errors_and_reuse(model):
    dec = decoder_for(model, 1, 8)
    with pytest.raises(ValueError, match="does not fit"):
        dec.prefill(torch.zeros(1, 8, dtype=torch.long))
    dec.prefill(torch.zeros(1, 7, dtype=torch.long))
    dec.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="full"):
        dec.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="context_length"):
        FastDecoder(model, FusedWeights(model), 1, model.config.context_length + 1)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_plain_path(model):
    m = copy.deepcopy(model).cuda()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [100, 200, 300]]
    fast = generate(m, prompts, max_new_tokens=24, temperature=0.0, fast=True)
    plain = generate(m, prompts, max_new_tokens=24, temperature=0.0, fast=False)
    assert fast == plain
    dec = decoder_for(m, 3, 7 + 24)
    assert dec.graph not in (None, False), "the decode step was not captured as a CUDA graph"
    again = generate(m, prompts, max_new_tokens=24, temperature=0.0, fast=True)  # the captured graph, reused
    assert again == plain
    single = generate(m, [[42]], max_new_tokens=24, temperature=0.0, fast=True)
    assert single[0] == plain[1]


@pytest.mark.gpu
def test_cuda_bf16_fast_logits_close_to_plain():
    m = Quark(PRESETS["test"]).init_weights(seed=5).eval().cuda().to(torch.bfloat16)
    idx = torch.randint(0, 500, (2, 20), device="cuda")
    with torch.no_grad():
        ref = m(idx)[:, 9:]
    dec = decoder_for(m, 2, 24)
    got = _decode_logits(dec, idx)
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("static", [False, True])
def test_per_row_positions_continuous_batching(model, static):
    """Rows prefilled one at a time into their own rows, then decoded together at different positions
    (the serving engine's pattern), match each sequence run alone through model.forward."""
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(1, 500, (1, n), generator=g) for n in (5, 11, 8)]
    dec = FastDecoder(model, FusedWeights(model), 3, 32, use_graph=static)
    last = [dec.prefill_rows(s[:, :-3], None, r) for r, s in enumerate(seqs)]
    with torch.no_grad():
        refs = [model(s)[0] for s in seqs]
    for r, s in enumerate(seqs):
        assert (last[r][0] - refs[r][s.shape[1] - 4]).abs().max().item() <= 1e-4
    for j in range(3):  # feed each row's next true token at its own slot
        tok = torch.stack([s[0, s.shape[1] - 3 + j] for s in seqs])
        pos = torch.tensor([s.shape[1] - 3 + j for s in seqs])
        out = dec.step(tok, pos)
        for r, s in enumerate(seqs):
            assert (out[r] - refs[r][s.shape[1] - 3 + j]).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="row"):
        dec.prefill_rows(torch.zeros(2, 4, dtype=torch.long), None, 2)  # rows 2..3 of a 3-row decoder


def test_prefill_rows_right_padded_prompts_then_per_row_steps(model):
    """Several prompts of different lengths prefilled at once (right-padded, into rows 1..3 of 4), then decoded
    at their own slots: each matches its sequence run alone, whatever the padding wrote beyond its length."""
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(1, 500, (n,), generator=g) for n in (9, 4, 13)]
    idx = torch.zeros(3, 10, dtype=torch.long)
    for r, s in enumerate(seqs):
        idx[r, :len(s) - 3] = s[:len(s) - 3]
    lengths = torch.tensor([len(s) - 3 for s in seqs])
    dec = FastDecoder(model, FusedWeights(model, transposed=True), 4, 32)
    last = dec.prefill_rows(idx, lengths, 1)
    with torch.no_grad():
        refs = [model(s[None])[0] for s in seqs]
    for r, s in enumerate(seqs):
        assert (last[r] - refs[r][len(s) - 4]).abs().max().item() <= 1e-4
    for j in range(3):
        tok = torch.stack([torch.tensor(0)] + [s[len(s) - 3 + j] for s in seqs])  # row 0 is idle
        pos = torch.tensor([0] + [len(s) - 3 + j for s in seqs])
        out = dec.step(tok, pos)
        for r, s in enumerate(seqs):
            assert (out[r + 1] - refs[r][len(s) - 3 + j]).abs().max().item() <= 1e-4


@pytest.mark.gpu
def test_cuda_graph_per_row_positions_match_forward(model):
    m = copy.deepcopy(model).cuda()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(1, 500, (1, n), generator=g).cuda() for n in (5, 11, 8)]
    dec = decoder_for(m, 3, 40)  # captured (B=4 bucket, 256 slots)
    last = [dec.prefill_rows(s[:, :-3], None, r) for r, s in enumerate(seqs)]
    with torch.no_grad():
        refs = [m(s)[0] for s in seqs]
    for r, s in enumerate(seqs):
        assert (last[r][0] - refs[r][s.shape[1] - 4]).abs().max().item() <= 1e-3
    for j in range(3):
        tok = torch.stack([s[0, s.shape[1] - 3 + j] for s in seqs])
        pos = torch.tensor([s.shape[1] - 3 + j for s in seqs], device="cuda")
        out = dec.step(tok, pos)
        for r, s in enumerate(seqs):
            assert (out[r] - refs[r][s.shape[1] - 3 + j]).abs().max().item() <= 1e-3
    assert dec.graph not in (None, False)


def test_one_change_to_the_model_math_reaches_every_path(monkeypatch):
    """The layer math lives once in quark/model.py: change RMSNorm's eps handling there and the training forward,
    the reference decoder, the fast decoder (eager and static), the serving engine and scoring all follow it."""
    import quark.model
    from quark.eval.scoring import score_tokens
    from quark.generate import Decoder
    from quark.serve.engine import Engine, SamplingParams

    m = Quark(PRESETS["test"]).init_weights(seed=3).eval()
    idx = torch.randint(1, 400, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = m(idx)
    orig = quark.model.rms_norm
    monkeypatch.setattr(quark.model, "rms_norm", lambda x, w, eps: orig(x, w, eps=0.5))  # the one-line change
    with torch.no_grad():
        ref = m(idx)
    assert (ref - base).abs().max().item() > 1e-2  # the change shows in the plain forward
    for dec in (Decoder(m, 2, 16), decoder_for(m, 2, 16), FastDecoder(m, FusedWeights(m), 2, 16, use_graph=True)):
        got = [dec.prefill(idx[:, :8])] + [dec.step(idx[:, t]) for t in range(8, 12)]
        assert (torch.stack(got, 1)[:, :-1] - ref[:, 7:-1]).abs().max().item() <= 1e-4, type(dec).__name__
    engine = Engine(m, stop_ids=[], max_batch=2)
    first = list(engine.iter_tokens(engine.submit(idx[0].tolist(), SamplingParams(1, temperature=0.0))))
    assert first == [int(ref[0, -1].argmax())]
    ctx, cont = idx[0, :8].tolist(), idx[0, 8:].tolist()
    (lp, _), = score_tokens(m, [(ctx, cont)])
    want = torch.log_softmax(ref[0, 7:11], -1).gather(1, idx[0, 8:12, None]).sum().item()
    assert abs(lp - want) <= 1e-3


def test_cuda_graph_step_traces_as_one_graph_on_cpu(model):
    """The CUDA path compiles the static decode step with fullgraph=True and the prefill forward with dynamic
    shapes; Dynamo's tracing (backend "eager": no inductor, seconds) runs here, so a graph break in the shared
    model code fails on every CI, not on the next lent GPU."""
    idx = torch.randint(1, 400, (2, 10), generator=torch.Generator().manual_seed(6))
    ref_dec = FastDecoder(model, FusedWeights(model), 2, 32, use_graph=True)
    dec = FastDecoder(model, FusedWeights(model), 2, 32, use_graph=True)
    dec._compiled_forward = torch.compile(dec.forward, dynamic=True, backend="eager")
    step = torch.compile(dec._static_step, fullgraph=True, dynamic=False, backend="eager")
    with torch.no_grad():
        assert (ref_dec.prefill(idx[:, :6]) - dec.prefill(idx[:, :6])).abs().max().item() <= 1e-5  # (eager: oneDNN)
        for t in range(6, 10):
            want = ref_dec.step(idx[:, t])
            dec.static_tok.copy_(idx[:, t:t + 1])
            dec.static_pos.fill_(t)
            assert (step() - want).abs().max().item() <= 1e-5


@pytest.fixture
def compiled_cpu(monkeypatch):
    """quark.fast's compiled CPU paths, on for the small test models (as for models larger than the caches), as
    on a CPU without quark's kernels (where they run, decode steps are quark::decode_layer calls instead:
    tests/test_decode_layer.py)."""
    import quark.fast as fast
    from quark import kernels

    if not fast.cpu_matvec_enabled():
        pytest.skip("QUARK_CPU_COMPILE=0 or compiling failed in this process")
    monkeypatch.setattr(fast, "MATVEC_MIN_BYTES", 0)
    monkeypatch.setattr(kernels, "_LOADED", [False])
    return fast


def test_one_row_cpu_matmul_is_the_compiled_reduction_and_falls_back(model, monkeypatch, compiled_cpu):
    """Batch-1 CPU fp32 decoding runs each matmul as inductor's compiled `(x * W).sum(-1)` (quark.fast.matvec): it
    equals x @ W.T, the decoder's logits equal the plain forward's, and when compiling fails (no C++ compiler)
    decoding warns once and goes on with eager matmuls, giving the same tokens."""
    import quark.fast as fast

    w, x = torch.randn(300, 64), torch.randn(1, 1, 64)
    assert torch.allclose(fast.matvec(x, w), x @ w.T, atol=1e-5, rtol=1e-5) and fast._MATVEC[0] is not None
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(idx)[:, 7:]
        weights = FusedWeights(model)
        assert weights.lm_head.matvec and not weights.lm_head.transposed
        got = _decode_logits(FastDecoder(model, weights, 1, 20), idx)
    assert (got - ref).abs().max().item() < 1e-4
    want = generate(model, [idx[0, :6].tolist()], max_new_tokens=12, temperature=0.0, fast=False)
    dec = decoder_for(model, 1, 20)
    assert dec.cpu_step and not dec.w.lm_head.transposed  # each layer of a step: one compiled call
    with torch.no_grad():
        got = _decode_logits(dec, idx)
    assert (got - ref).abs().max().item() < 1e-4 and fast._STEP[0] is not None
    assert generate(model, [idx[0, :6].tolist()], max_new_tokens=12, temperature=0.0) == want

    def broken(*_a):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fast, "_STEP", [broken])
    with pytest.warns(UserWarning, match="compiled CPU decode step unavailable"):
        assert generate(model, [idx[0, :6].tolist()], max_new_tokens=12, temperature=0.0) == want
    assert fast._STEP == [None]
    monkeypatch.setattr(fast, "_STEP", [])
    monkeypatch.setattr(fast, "_MATVEC", [broken])
    with pytest.warns(UserWarning, match="compiled CPU matmul unavailable"):
        assert generate(model, [idx[0, :6].tolist()], max_new_tokens=12, temperature=0.0, fast=True) == want
    assert fast._MATVEC == [None] and not fast.cpu_matvec_enabled()
    assert decoder_for(model, 1, 20).w.lm_head.transposed  # later decoders take the eager layout


_real_cpu_step = FastDecoder._cpu_step


def test_compiled_cpu_step_in_the_engine_and_with_a_longer_cache(model, monkeypatch, compiled_cpu):
    """The engine's one-row steps (per-row slot tensors, a multi-row cache) take the compiled step too, and a
    second, longer cache reuses it (its length is dynamic): same tokens as the plain path."""
    from quark.serve.engine import Engine, SamplingParams

    prompt = [5, 9, 2, 7]
    want = generate(model, [prompt], max_new_tokens=10, temperature=0.0, fast=False)
    assert generate(model, [prompt], max_new_tokens=10, temperature=0.0) == want
    assert generate(model, [prompt], max_new_tokens=40, temperature=0.0)[0][:10] == want[0]
    calls = []

    def counted(self, *a):
        calls.append(1)
        return _real_cpu_step(self, *a)

    monkeypatch.setattr(FastDecoder, "_cpu_step", counted)
    engine = Engine(model, stop_ids=[], max_batch=2)
    assert engine.dec.cpu_step
    req = engine.submit(prompt, SamplingParams(10, 0.0, 1.0, 1.0))
    while req.finish_reason is None:
        engine.step()
    toks = []
    while not req.events.empty():
        kind, value = req.events.get()
        toks += [value] if kind == "token" else []
    assert toks == want[0] and len(calls) >= 9


def test_compiled_cpu_step_takes_int8_weights(model, compiled_cpu):
    """Without quark's kernels, an int8 model's one-row steps run the compiled step too (each int8 row dequantized
    inside the reduction): its logits track the model with the dequantized weights in fp32 (fbgemm's kernel, which
    runs the lm_head, quantizes the activation rows: ~1%)."""
    from quark.quantize import Int8Linear, quantize_int8

    q = quantize_int8(copy.deepcopy(model))
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, Int8Linear) and name != "lm_head":
                deq.get_submodule(name).weight.copy_(mod.dequantized())
        deq.model.embed_tokens.weight.copy_(q.lm_head.dequantized())
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(8))
    dec = decoder_for(q, 1, 20)
    assert dec.cpu_step
    with torch.no_grad():
        ref = deq(idx)[:, 7:]
        got = _decode_logits(dec, idx)
    assert ((got - ref).norm() / ref.norm()).item() < 0.03
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.85


def test_compiled_cpu_step_attends_the_slots_in_use(model, monkeypatch, compiled_cpu):
    """The compiled step attends over the cache slots in use rounded up to SPAN_STEP (not the whole cache, which
    for `quark chat`/`serve` holds 2048 slots): logits equal the full forward's while that span grows up to the
    cache's length, with and without left padding, and neither the span nor the cache length recompiles it."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("QUARK_THREADS", "1")  # (each thread count is compiled once)
    monkeypatch.setattr(compiled_cpu, "SPAN_STEP", 4)
    spans, real_span = [], compiled_cpu._span
    monkeypatch.setattr(compiled_cpu, "_span", lambda span, n: spans.append(real := real_span(span, n)) or real)
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(idx)[:, 7:]
        longer = _decode_logits(FastDecoder(model, FusedWeights(model), 1, 40), idx)  # compiled here (or before)
        graphs = counters["stats"]["unique_graphs"]
        got = _decode_logits(FastDecoder(model, FusedWeights(model), 1, 16), idx)  # the last span is the cache
        assert counters["stats"]["unique_graphs"] == graphs  # neither the cache's length nor the span recompiled
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), idx], 1)
        mask = torch.ones(1, 20, dtype=torch.bool)
        mask[:, :4] = False
        left = [_decode_logits(FastDecoder(model, FusedWeights(model), 1, n), padded, mask) for n in (24, 33)]
    assert counters["stats"]["unique_graphs"] <= graphs + 1  # with a key mask: one more, for every length
    assert [len(s) for s in spans[8:16]] == [12, 12, 12, 12, 16, 16, 16, 16]
    assert (got - ref).abs().max().item() < 1e-4 and (longer - ref).abs().max().item() < 1e-4
    assert max((x[:, -9:] - ref).abs().max().item() for x in left) < 1e-4


def test_compiled_cpu_step_is_one_call_per_token_and_per_layer_without_nested_regions(model, monkeypatch,
                                                                                     compiled_cpu):
    """A decode step runs every layer in one compiled call (each layer a nested compile region of the one layer
    graph); a torch without nested regions compiles the layer step alone and calls it once per layer. Both give
    the plain forward's logits."""
    if compiled_cpu._LAYER is None:
        pytest.skip("this torch has no torch.compiler.nested_compile_region")
    idx = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(idx)[:, 5:]

    def decode_counting(step):
        calls = []
        monkeypatch.setattr(compiled_cpu, "_STEP", [lambda *a: calls.append(1) or step(*a)])
        with torch.no_grad():
            got = _decode_logits(decoder_for(model, 1, 20), idx)
        assert (got - ref).abs().max().item() < 1e-4
        return len(calls)

    monkeypatch.setattr(compiled_cpu, "_STEP", [])
    assert decode_counting(compiled_cpu.compiled_token_step()) == 6  # 6 steps, one call each
    monkeypatch.setattr(compiled_cpu, "_LAYER", None)
    monkeypatch.setattr(compiled_cpu, "_STEP", [])
    fallback = compiled_cpu.compiled_token_step()  # what an older torch gets: a loop over the compiled layer
    assert isinstance(fallback, functools.partial) and fallback.func is compiled_cpu._token_step
    layer, layer_calls = fallback.keywords["layer"], []
    counted = functools.partial(fallback.func, layer=lambda *a: layer_calls.append(1) or layer(*a))
    assert decode_counting(counted) == 6 and len(layer_calls) == 6 * model.config.n_layers


def test_compiled_cpu_step_takes_int4_weights(model, compiled_cpu):
    """Without quark's kernels, an int4 model's one-row steps run the compiled step too, torch's int4 kernel called
    from the graph: the same logits as its eager steps (which call that kernel directly)."""
    from quark.quantize import quantize_int4

    q = quantize_int4(copy.deepcopy(model))
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(10))
    dec = decoder_for(q, 1, 20)
    eager = FastDecoder(q, dec.w, 1, 20)
    eager.cpu_step = False
    assert dec.cpu_step and dec.w.layers[0].step_args[0][2][1].dim() == 3  # (nibbles, scales_and_zeros, packed)
    with torch.no_grad():
        got, want = _decode_logits(dec, idx), _decode_logits(eager, idx)
    assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()


def test_cpu_batches_run_onednn_and_follow_weight_changes(compiled_cpu):
    """Several rows at once on the CPU with fp32 (out, in) weights (batched decode steps, prefill) go through
    oneDNN's linear, decode batches through a packed copy: the same tokens as the plain path, also after an
    optimizer step and a load_state_dict (the packed copy is rebuilt), and equal to F.linear."""
    import torch.nn.functional as F

    m = Quark(PRESETS["test"]).init_weights(seed=9).eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]

    def same_as_plain():
        return _fast_equals_plain(m, prompts)

    before = same_as_plain()
    head = decoder_for(m, len(prompts), 20).w.lm_head
    assert head.dnnl and head._dnnl_packed is not None and not head.transposed
    opt = torch.optim.SGD(m.parameters(), lr=5.0)
    m.loss(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[7, 7, 7, 7]])).backward()
    opt.step()
    assert same_as_plain() != before
    m.load_state_dict(Quark(PRESETS["test"]).init_weights(seed=9).state_dict())
    assert same_as_plain() == before
    x = torch.randn(2, 5, m.config.d_model)  # 10 rows: oneDNN on the plain (out, in) weight
    with torch.no_grad():
        assert torch.allclose(head(x), F.linear(x, m.lm_head.weight), atol=1e-5, rtol=1e-5)
        assert torch.allclose(head(x[:1, :3]), F.linear(x[:1, :3], m.lm_head.weight), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_cpu_step_takes_batches_of_quantized_rows(model, monkeypatch, compiled_cpu, bits):
    """Without quark's kernels, quantized models run batched decode steps through the compiled step too (torch's
    int8 / int4 kernels take the rows), with per-row slots as the engine steps them: the logits of the eager steps,
    and one graph for every batch size above one."""
    from torch._dynamo.utils import counters

    from quark.quantize import quantize_int4, quantize_int8

    monkeypatch.setenv("QUARK_THREADS", "1")
    q = (quantize_int8 if bits == 8 else quantize_int4)(copy.deepcopy(model))
    weights = FusedWeights(q)
    idx = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(11))

    def logits(rows: bool, b: int) -> torch.Tensor:
        dec = FastDecoder(q, weights, 3, 20)
        assert dec.cpu_step and dec.cpu_step_rows
        dec.cpu_step_rows = rows
        out = [dec.prefill_rows(idx[:b, :5], None, 0)]
        for t in range(5, 12):
            out.append(dec.step(idx[:b, t], torch.full((b,), t), t + 1))
        return torch.stack(out)

    calls = []
    monkeypatch.setattr(FastDecoder, "_cpu_step",
                        lambda self, idx, *a: calls.append(idx.shape[0]) or _real_cpu_step(self, idx, *a))
    with torch.no_grad():
        got = logits(True, 3)
        graphs = counters["stats"]["unique_graphs"]
        got2 = logits(True, 2)
        want = logits(False, 3)
    assert compiled_cpu._STEP[0] is not None  # compiled, not the warned eager fallback
    assert counters["stats"]["unique_graphs"] == graphs  # batch 2 reused batch 3's graph
    assert calls == [3] * 7 + [2] * 7
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()  # quantized activations in both paths
    assert (got2 - want[:, :2]).abs().max().item() <= 2e-2 * want.abs().max().item()


def test_a_tuned_compiled_step_compiles_every_thread_count_at_its_first_token(model, compiled_cpu, monkeypatch):
    """Under the thread tuner, the first one-row step and the first several-row step of a model run the compiled
    step at every candidate count (dynamo compiles per count), so no later probe of the tuner stalls a token on a
    compile; the tokens are those of a decoder pinned to one count."""
    from quark.cpu_settings import Pinned, ThreadTuner
    from quark.quantize import quantize_int8

    q = quantize_int8(copy.deepcopy(model))
    counts = []
    step = compiled_cpu.compiled_token_step()
    monkeypatch.setattr(compiled_cpu, "_STEP", [lambda *a: counts.append(torch.get_num_threads()) or step(*a)])
    idx = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(11))
    tuner = ThreadTuner(max_threads=2)
    dec = decoder_for(q, 1, 20)
    weights = dec.w
    with torch.no_grad():
        got = _decode_logits(FastDecoder(q, weights, 1, 20, runner=tuner), idx[:1])
        assert sorted(counts[:2]) == [1, 2] and weights.warm == {False}  # the first token: both counts
        assert tuner.ran == {1, 2}
        n_one = len(counts)
        rows = _decode_logits(FastDecoder(q, weights, 2, 20, runner=tuner), idx)
        assert sorted(counts[n_one:n_one + 2]) == [1, 2] and weights.warm == {False, True}
        assert len(counts) == n_one + 2 + (idx.shape[1] - 5 - 1)  # once more for the first batched step only
        want = _decode_logits(FastDecoder(q, weights, 1, 20, runner=Pinned(1)), idx[:1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # several rows run torch's int8 kernel on bf16 activations, one row dequantizes in fp32
    assert (rows[:1] - want).abs().max() <= 2e-2 * want.abs().max()
