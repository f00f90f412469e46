"""Generation: greedy against HF generate, batching with left padding, sampling rules, errors, streaming."""

import pytest
import torch

from quark import Quark
from quark.config import PRESETS
from quark.generate import generate, generate_text, stream_text_ids
from quark.sampling import apply_rep_penalty, argmax_rows, greedy, sample_next


@pytest.fixture(scope="module")
def model():
    return Quark(PRESETS["test"]).init_weights(seed=3).eval()


def test_greedy_matches_hf_generate(model):
    pytest.importorskip("transformers")
    from tests.test_model import llama_twin

    hf = llama_twin(model)
    prompt = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                      pad_token_id=0)
    ours = generate_text(model, prompt, max_new_tokens=20, temperature=0.0)
    assert ours.tolist() == ref.tolist()


def test_batched_left_padded_equals_one_by_one(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [100, 200, 300]]
    batched = generate(model, prompts, max_new_tokens=12, temperature=0.0)
    single = [generate(model, [p], max_new_tokens=12, temperature=0.0)[0] for p in prompts]
    assert batched == single


def test_generate_text_attention_mask_and_eos_padding(model):
    solo = generate(model, [[7, 8, 9]], max_new_tokens=8, temperature=0.0)[0]
    eos = solo[2]
    ids = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = generate_text(model, ids, max_new_tokens=8, temperature=0.0, eos_token_id=eos, attention_mask=mask)
    assert out[0, 5:8].tolist() == solo[:3]
    assert (out[0, 8:] == eos).all()  # stopped at eos, padded with it


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, [[1, 2, 3]], max_new_tokens=15, temperature=1.0, top_p=0.95, seed=123)
    b = generate(model, [[1, 2, 3]], max_new_tokens=15, temperature=1.0, top_p=0.95, seed=123)
    c = generate(model, [[1, 2, 3]], max_new_tokens=15, temperature=1.0, top_p=0.95, seed=124)
    assert a == b and a != c


def test_streaming_yields_the_same_tokens(model):
    it = stream_text_ids(model, [4, 5, 6], max_new_tokens=10, temperature=0.0)
    first = next(it)
    assert isinstance(first, int)
    assert [first, *it] == generate(model, [[4, 5, 6]], max_new_tokens=10, temperature=0.0)[0]


def test_nan_logits_fall_back_to_greedy():
    logits = torch.tensor([[0.1, 3.0, float("nan"), 0.2], [0.0, 1.0, 2.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tok = sample_next(logits, temperature=1.0, top_p=1.0, generator=g)
        assert tok[0].item() == 1  # greedy over the finite entries
    inf = torch.tensor([[float("inf"), 0.0, 1.0, 0.0]])
    assert sample_next(inf, temperature=0.7).item() == 0


def test_argmax_rows_is_torch_argmax_first_maximum_included():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 49152, generator=g)
    x[1, 7] = x[1, 40000] = 100.0  # a tie: the first one, as torch.argmax
    x[2] = -float("inf")
    x[2, 123] = 0.0
    for t in (x, x[:, ::2], x.double(), x.bfloat16()):  # contiguous, strided, numpy's dtypes and torch's own
        got = argmax_rows(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(-1))
    assert argmax_rows(x)[1] == 7


def test_greedy_is_the_argmax_over_finite_entries_in_every_row():
    """`greedy` (one argmax, rows cleaned only where its maximum is not finite) equals the argmax of the cleaned
    logits: NaN as -inf, +inf as the largest float, for rows with a NaN, a +inf, -inf entries, and all -inf."""
    nan, inf = float("nan"), float("inf")
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    x[1, 5] = nan
    x[1, 9] = 50.0
    x[2, 17] = x[2, 40] = inf
    x[3, ::2] = -inf
    x[4] = -inf
    x[5, 0] = nan
    x[5, 1] = -inf
    for t in (x, x.double(), x.bfloat16()):
        want = torch.nan_to_num(t.float(), nan=-inf, posinf=torch.finfo(torch.float32).max).argmax(-1)
        assert torch.equal(greedy(t), want)
        assert torch.equal(sample_next(t, temperature=0.0), want)
    assert greedy(x)[1] == 9 and greedy(x)[2] == 17


def test_nan_injected_into_the_model_does_not_propagate(model, monkeypatch):
    real = Quark.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out[..., 10] = float("nan")
        return out

    monkeypatch.setattr(Quark, "forward", poisoned)
    out = generate(model, [[1, 2, 3]], max_new_tokens=6, temperature=0.8, seed=0)[0]
    assert len(out) == 6 and all(0 <= t < model.config.vocab_size for t in out)


def test_rep_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_rep_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_rep_penalty_changes_greedy_output(model):
    plain = generate(model, [[1, 2, 3]], max_new_tokens=30, temperature=0.0)[0]
    pen = generate(model, [[1, 2, 3]], max_new_tokens=30, temperature=0.0, rep_penalty=1e6)[0]
    assert len(set(pen)) == len(pen)  # a huge penalty forbids any repeat... of the prompt too
    assert not {1, 2, 3} & set(pen)
    assert plain != pen


@pytest.mark.parametrize("kw,name", [(dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
                                     (dict(top_p=1.5), "top_p"), (dict(rep_penalty=0.0), "rep_penalty"),
                                     (dict(max_new_tokens=-1), "max_new_tokens")])
def test_invalid_arguments_name_the_argument(model, kw, name):
    with pytest.raises(ValueError, match=name):
        generate(model, [[1, 2]], **kw)


def test_context_overflow_is_a_clear_error(model):
    with pytest.raises(ValueError, match="context length"):
        generate(model, [[1] * 100], max_new_tokens=29)
    assert len(generate(model, [[1] * 100], max_new_tokens=28, temperature=0.0)[0]) == 28


def test_card_signature_defaults():
    import inspect

    sig = inspect.signature(generate_text)
    want = dict(max_new_tokens=200, temperature=0.7, top_p=0.9, rep_penalty=1.0, eos_token_id=None)
    assert {k: sig.parameters[k].default for k in want} == want
