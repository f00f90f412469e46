"""The fast decoder (quark/fast.py) against the plain model.forward + KVCache path and full-sequence logits."""

import copy

import pytest
import torch

from quark import Quark, kernels
from quark.config import PRESETS
from quark.fast import EagerStep, FastDecoder, GraphStep, KernelStep, decoder_for
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
    dec = FastDecoder(model, 3, 40, GraphStep if static else None)
    got = _decode_logits(dec, idx)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("static", [False, True])
def test_left_padded_rows_match_unpadded(model, static):
    short = torch.randint(1, 500, (1, 10), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1)
    key_mask = torch.cat([torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], 1)
    dec = FastDecoder(model, 2, 32, GraphStep if static else None)
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


@pytest.mark.parametrize("prompts", [[[1, 2, 3]], [[1, 2, 3], [4, 5]]])  # one row; batched
def test_fused_weights_follow_optimizer_steps_loads_edits_and_replacement(prompts):
    """Every generation's decoder fuses the model's current weights: an optimizer step, a load_state_dict, a hand
    edit and a replaced tensor are all seen, with nothing installed on the optimizer or the model."""
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
    with torch.no_grad():  # a hand edit
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
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
        FastDecoder(model, 1, model.config.context_length + 1)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_plain_path(model):
    m = copy.deepcopy(model).cuda()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [100, 200, 300]]
    fast = generate(m, prompts, max_new_tokens=24, temperature=0.0, fast=True)
    plain = generate(m, prompts, max_new_tokens=24, temperature=0.0, fast=False)
    assert fast == plain
    dec = decoder_for(m, 3, 7 + 24)
    assert dec.how.graph not in (None, False), "the decode step was not captured as a CUDA graph"
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
    dec = FastDecoder(model, 3, 32, GraphStep if static else None)
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
    dec = FastDecoder(model, 4, 32)
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
    assert dec.how.graph not in (None, False)


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
    # (the C++ copy of the layer, KernelStep's, is held to layer_forward by tests/test_decode_layer.py)
    for dec in (Decoder(m, 2, 16), FastDecoder(m, 2, 16, EagerStep), FastDecoder(m, 2, 16, GraphStep)):
        got = [dec.prefill(idx[:, :8])] + [dec.step(idx[:, t]) for t in range(8, 12)]
        assert (torch.stack(got, 1)[:, :-1] - ref[:, 7:-1]).abs().max().item() <= 1e-4, type(dec).__name__
    engine = Engine(m, stop_ids=[], max_batch=2)
    first = list(engine.iter_tokens(engine.submit(idx[0].tolist(), SamplingParams(1, temperature=0.0))))
    assert first == [int(ref[0, -1].argmax())]
    ctx, cont = idx[0, :8].tolist(), idx[0, 8:].tolist()
    (lp, _), = score_tokens(m, [(ctx, cont)])
    want = torch.log_softmax(ref[0, 7:11], -1).gather(1, idx[0, 8:12, None]).sum().item()
    assert abs(lp - want) <= 1e-3


def test_cuda_graph_step_traces_as_one_graph_on_cpu(model, monkeypatch):
    """The CUDA path compiles the static decode step with fullgraph=True and the prefill forward with dynamic
    shapes; Dynamo's tracing (backend "eager": no inductor, seconds) runs here, so a graph break in the shared
    model code fails on every CI, not on the next lent GPU (with the CPU's kernels off, as on CUDA)."""
    monkeypatch.setenv("QUARK_CPU_ISA", "torch")
    idx = torch.randint(1, 400, (2, 10), generator=torch.Generator().manual_seed(6))
    ref_dec = FastDecoder(model, 2, 32, EagerStep)
    dec = FastDecoder(model, 2, 32, GraphStep)
    dec.how.compiled_forward = torch.compile(dec.forward, dynamic=True, backend="eager")
    step = torch.compile(lambda: dec.how.static_step(dec), fullgraph=True, dynamic=False, backend="eager")
    with torch.no_grad():
        assert (ref_dec.prefill(idx[:, :6]) - dec.prefill(idx[:, :6])).abs().max().item() <= 1e-5
        for t in range(6, 10):
            want = ref_dec.step(idx[:, t])
            dec.how.tok.copy_(idx[:, t:t + 1])
            dec.how.pos.fill_(t)
            assert (step() - want).abs().max().item() <= 1e-5


def test_decoder_for_picks_one_step(model, monkeypatch):
    """decoder_for picks the step once: quark's kernels where they run (fp32 activations), else eager torch (also
    with QUARK_CPU_ISA=torch, which gives the same greedy tokens)."""
    prompts = [[5, 6, 7, 8], [9]]
    want = generate(model, prompts, max_new_tokens=12, temperature=0.0, fast=False)
    assert isinstance(decoder_for(model, 2, 16).how, KernelStep if kernels.available() else EagerStep)
    assert isinstance(decoder_for(copy.deepcopy(model).bfloat16(), 2, 16).how, EagerStep)
    monkeypatch.setenv("QUARK_CPU_ISA", "torch")
    assert isinstance(decoder_for(model, 2, 16).how, EagerStep)
    assert generate(model, prompts, max_new_tokens=12, temperature=0.0) == want
    monkeypatch.setenv("QUARK_FAST", "0")
    assert decoder_for(model, 2, 16) is None


def _anon_huge_kb(addr: int) -> int | None:
    """AnonHugePages (kB) of this process's mapping holding `addr`, from /proc/self/smaps (None off Linux)."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for ln in lines:
        head = ln.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "AnonHugePages:":
            return int(ln.split()[1])
    return None


def test_cpu_decode_weights_are_copies_in_huge_pages_that_follow_refresh():
    """A matrix's copy, and a whole decoder's weights in one buffer, in 2 MiB pages where Linux grants them."""
    from quark.fast import HUGE_PAGE, FusedLinear, FusedWeights, HugePageArena, huge_page_empty
    from quark.quantize import Int8Linear

    if huge_page_empty([HUGE_PAGE], torch.uint8) is None:
        pytest.skip("no madvise(MADV_HUGEPAGE) here (not Linux)")
    lin = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB: two huge pages
    f = FusedLinear([lin], HugePageArena(HugePageArena.size([lin.weight])))
    part = f.parts[0]
    assert part.data_ptr() != lin.weight.data_ptr() and part.data_ptr() % HUGE_PAGE == 0

    def layout(w):  # fp32 where quark's kernels run: f32_gemv's layout
        return kernels.f32_pack(w.detach()) if kernels.available() else w.detach()

    assert torch.equal(part, layout(lin.weight))
    with torch.no_grad():
        lin.weight.mul_(2)
    f.refresh()
    assert torch.equal(part, layout(lin.weight))
    small = FusedLinear([Int8Linear.from_float(torch.randn(64, 64))])  # no arena: the module's own tensors
    assert small.parts[0].data_ptr() == small.mods[0].weight.data_ptr()
    # a decoder's weights share one buffer: matrices under 2 MiB (most of the tiny preset's) are in huge pages too
    w = FusedWeights(Quark(PRESETS["tiny"]).eval())
    parts = [p for lin in w.linears for p in lin.parts if p is not None]
    assert parts[0].data_ptr() % HUGE_PAGE == 0
    assert len({p.untyped_storage().data_ptr() for p in parts}) == 1
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        mode = "[never]"
    if "[never]" not in mode:  # the kernel grants huge pages to madvised memory: these are
        assert (_anon_huge_kb(part.data_ptr()) or 0) >= HUGE_PAGE // 1024
        assert (_anon_huge_kb(parts[0].data_ptr()) or 0) >= HUGE_PAGE // 1024
