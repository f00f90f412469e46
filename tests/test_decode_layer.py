"""quark::decode_layer (quark/csrc/layer.h, the C++ copy of `quark.model.layer_forward`) in every tier this CPU runs,
against `layer_forward` on the same fp32 / int8 / int4 weights, for 1..8 rows at their own slots with padded keys,
over the test preset and the shapes of Quark-72M (8/2 heads, d 512) and SmolLM2-135M (9/3 heads, d 576); the fast
decoder's kernel steps against its eager steps; and bad operands. A change to the layer math in one place and not
the other fails here."""

import copy
import dataclasses

import pytest
import torch

from quark import Quark, kernels
from quark.config import PRESETS
from quark.fast import EagerStep, FastDecoder, FusedWeights, KernelStep
from quark.model import Context, KVCache, layer_forward
from quark.quantize import quantize_int4, quantize_int8
from tests.test_fast import noisy_test_model
from tests.test_kernels import tier  # noqa: F401 -- the fixture: every tier this CPU runs

SHAPES = {  # one layer of each (the layers are alike), a small vocabulary
    "quark-72m": dataclasses.replace(PRESETS["quark-72m"], n_layers=1, vocab_size=300, context_length=64),
    "smollm2-135m": dataclasses.replace(PRESETS["test"], n_layers=1, d_model=576, n_heads=9, n_kv_heads=3,
                                        head_dim=64, d_ff=1536, vocab_size=300, context_length=64, rope_theta=1e5),
}


def _model(shape: str) -> Quark:
    if shape == "test":
        return noisy_test_model()
    m = Quark(SHAPES[shape]).init_weights(seed=1).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _quantized(model, bits):
    return {32: copy.deepcopy, 8: quantize_int8, 4: quantize_int4}[bits](copy.deepcopy(model))


@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("shape", ["test", "quark-72m", "smollm2-135m"])
def test_decode_layer_is_layer_forward(tier, shape, bits):  # noqa: F811
    """The same layer output and the same cache contents as `layer_forward` over the fused layer, for 1..8 rows at
    their own slots (one row unmasked, more rows with padded keys: a key mask) over random earlier keys."""
    q = _quantized(_model(shape), bits)
    w = FusedWeights(q)
    L = 24
    for rows in range(1, 9):
        g = torch.Generator().manual_seed(rows + bits)
        ref_cache, cache = KVCache(q.config, rows, L), KVCache(q.config, rows, L)
        for a, b in zip(ref_cache.k + ref_cache.v, cache.k + cache.v):
            a.copy_(torch.randn(a.shape, generator=g))
            b.copy_(a)
        x = torch.randn(rows, 1, q.config.d_model, generator=g) * 3
        if rows == 1:
            slots, key_mask, n_keys, slot_t = 9, None, 10, torch.tensor([9])
        else:
            slot_t = torch.randint(0, 20, (rows,), generator=g)
            slots, n_keys = slot_t[:, None], 20
            key_mask = torch.rand(rows, L, generator=g) > 0.3
            key_mask[0, slot_t[0]] = False  # a row's own slot is seen even when masked
        with torch.no_grad():
            for i, layer in enumerate(w.layers):
                ctx = Context.build(w.tables, 1, cache=ref_cache, slots=slots, key_mask=key_mask, n_keys=n_keys)
                want = layer_forward(layer, x, ctx, i).reshape(rows, -1)
                got = x.reshape(rows, -1).clone()
                kernels.decode_layer(got, layer.kernel_args(), (cache.k[i], cache.v[i]), w.tables, slot_t,
                                     key_mask=key_mask, n_keys=n_keys, tier=tier)
                # fp32: exact to rounding. int8/int4: layer_forward's matmuls are quark's kernels too (the same
                # activation grid; a value rounding the other way moves a product by a step), or with
                # QUARK_CPU_ISA=torch torch's kernels on bf16 activations
                tol = 1e-4 if bits == 32 else 2e-3 if kernels.available() else 3e-2
                assert (got - want).abs().max() <= tol * want.abs().max(), (rows, i)
                for got_kv, want_kv in ((cache.k[i], ref_cache.k[i]), (cache.v[i], ref_cache.v[i])):
                    assert (got_kv - want_kv).abs().max() <= tol * want_kv.abs().max(), (rows, i)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_decoder_steps_run_decode_layer_and_match_eager_steps(monkeypatch, bits):
    """Decode steps (one row, and three at their own slots as the serving engine steps them) are one
    quark::decode_layer call a layer where the kernels run, with the logits of the decoder's eager steps; so are
    prefills of up to KernelStep.max_rows tokens in all (their tokens packed as the call's rows)."""
    if not kernels.available():
        pytest.skip("quark's kernels do not run here")
    q = _quantized(noisy_test_model(), bits)
    weights = FusedWeights(q)
    idx = torch.randint(0, q.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(11))
    calls = []
    real = kernels.decode_layer
    monkeypatch.setattr(kernels, "decode_layer", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))

    def logits(step: type, b: int) -> torch.Tensor:
        dec = FastDecoder(q, 3, 20, step, weights)
        out = [dec.prefill_rows(idx[:b, :5], None, 0)]
        for t in range(5, 12):
            out.append(dec.step(idx[:b, t], torch.full((b,), t), t + 1))
        return torch.stack(out)

    assert isinstance(FastDecoder(q, 1, 8).how, KernelStep)
    with torch.no_grad():
        for b in (1, 3):
            got = logits(KernelStep, b)
            packed = [5 * b] * q.config.n_layers if 5 * b <= FastDecoder(q, 1, 8).how.max_rows else []
            assert calls == packed + [b] * 7 * q.config.n_layers
            calls.clear()
            want = logits(EagerStep, b)
            assert not calls
            assert (got - want).abs().max() <= 2e-3 * want.abs().max()
            assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_packed_prefill_is_the_eager_prefill(bits):
    """KernelStep's prefill (the prompts' real tokens as the rows of one decode_layer call a layer, each prompt's
    sharing its cache row) against the eager prefill: right-padded prompts of three lengths, the same after a
    prefix at per-row offsets, and left-padded prompts under a key mask; the same logits and cache slots."""
    if not kernels.available():
        pytest.skip("quark's kernels do not run here")
    q = _quantized(noisy_test_model(), bits)
    weights = FusedWeights(q)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, q.config.vocab_size, (3, 7), generator=g)
    lengths, offsets = torch.tensor([7, 3, 5]), torch.tensor([4, 3, 5])  # an offset within the row's prompt
    key_mask = torch.ones(3, 7, dtype=torch.bool)
    key_mask[1, :3] = key_mask[2, :1] = False
    decs = {step: FastDecoder(q, 4, 24, step, weights) for step in (EagerStep, KernelStep)}
    decs[KernelStep].how.max_rows = 64
    with torch.no_grad():
        got, want = ([dec.prefill_rows(idx, lengths, 1), dec.prefill_rows(idx, lengths, 1, offsets, 20),
                      dec.prefill(idx, key_mask)] for dec in decs.values())
    tol = 1e-4 if bits == 32 else 2e-3
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= tol * b.abs().max()
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    real = torch.zeros(4, 24, dtype=torch.bool)  # (cache row, slot) written: the last call's, row 3's before it
    real[:3, :7] = True
    real[3, :10] = True
    kernel, eager = (dec.cache.k + dec.cache.v for dec in decs.values())
    for a, b in zip(kernel, eager):
        assert (a.transpose(1, 2)[real] - b.transpose(1, 2)[real]).abs().max() <= tol * b.abs().max()


def test_decode_layer_rejects_bad_operands_with_a_clear_error(tier):  # noqa: F811
    q = _quantized(noisy_test_model(), 8)
    w = FusedWeights(q)
    cache = KVCache(q.config, 1, 10)
    x = torch.randn(1, q.config.d_model)
    args, kv = w.layers[0].kernel_args(), (cache.k[0], cache.v[0])

    def call(*a, **k):
        kernels.decode_layer(*a, **k, tier=tier)

    with pytest.raises(RuntimeError, match=r"slot 10 of row 0 outside \[0, 10\)"):
        call(x, args, kv, w.tables, torch.tensor([10]), key_mask=None, n_keys=10)
    with pytest.raises(RuntimeError, match="caches must be contiguous float32"):
        call(x, args, (kv[0].bfloat16(), kv[1]), w.tables, torch.tensor([1]), key_mask=None, n_keys=10)
    with pytest.raises(RuntimeError, match=r"x must be a contiguous float32 CPU \(B, D\)"):
        call(x.double(), args, kv, w.tables, torch.tensor([1]), key_mask=None, n_keys=10)
    with pytest.raises(RuntimeError, match=r"n_keys must be in \[1, 10\]"):
        call(x, args, kv, w.tables, torch.tensor([1]), key_mask=None, n_keys=11)
    with pytest.raises(RuntimeError, match=r"cache row 1 of row 0 outside \[0, 1\)"):
        call(x, args, kv, w.tables, torch.tensor([1]), key_mask=None, n_keys=10, cache_rows=torch.tensor([1]))
