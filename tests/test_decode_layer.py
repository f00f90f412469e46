"""quark::decode_layer (quark/csrc/decode_layer.cpp): one fp32 / int8 / int4 decoder layer in C++ against
`quark.model.layer_forward` on the same weights (one row and several rows with per-row slots and padding), the
fast decoder's steps through it against its eager steps, and bad operands."""

import copy

import pytest
import torch

from quark import kernels
from quark.fast import FastDecoder, FusedWeights
from quark.model import Context, KVCache, layer_forward
from quark.quantize import quantize_int4, quantize_int8
from tests.test_fast import noisy_test_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="quark's CPU kernels need a CPU with AVX512-VNNI "
                                "(and -BW, -VL) and a C++ compiler (g++) with ninja (pip install ninja)")


@pytest.fixture(scope="module")
def model():
    return noisy_test_model()


def _quantized(model, bits):
    return {32: copy.deepcopy, 8: quantize_int8, 4: quantize_int4}[bits](copy.deepcopy(model))


@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_layer_is_layer_forward(model, bits, rows):
    """The same layer output and the same cache contents as `layer_forward` over the fused layer, for one row at
    slot 9 and for three rows at their own slots with padded keys (a key mask), over random earlier keys."""
    q = _quantized(model, bits)
    w = FusedWeights(q)
    assert w.kernel_layers is not None
    g = torch.Generator().manual_seed(rows + bits)
    L = 24
    ref_cache, cache = KVCache(q.config, rows, L), KVCache(q.config, rows, L)
    for a, b in zip(ref_cache.k + ref_cache.v, cache.k + cache.v):
        a.copy_(torch.randn(a.shape, generator=g))
        b.copy_(a)
    x = torch.randn(rows, 1, q.config.d_model, generator=g) * 3
    if rows == 1:
        slots, key_mask, n_keys = 9, None, 10
        slot_t = torch.tensor([9])
    else:
        slot_t = torch.tensor([4, 17, 0])
        slots, n_keys = slot_t[:, None], 20
        key_mask = torch.rand(rows, L, generator=g) > 0.3
        key_mask[1, 17] = False  # a row's own slot is seen even when masked
    with torch.no_grad():
        for i in range(q.config.n_layers):
            ctx = Context.build(w.tables, 1, cache=ref_cache, slots=slots, key_mask=key_mask, n_keys=n_keys)
            want = layer_forward(w.layers[i], x, ctx, i)
            got = x.reshape(rows, -1).clone()
            kernels.decode_layer(got, w.kernel_layers[i], (cache.k[i], cache.v[i]), w.tables, slot_t,
                                 key_mask=key_mask, n_keys=n_keys)
            assert (got - want.reshape(rows, -1)).abs().max() <= 1e-4 * want.abs().max()
            torch.testing.assert_close(cache.k[i], ref_cache.k[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.v[i], ref_cache.v[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_decoder_steps_run_decode_layer_and_match_eager_steps(model, monkeypatch, bits):
    """A quantized model's decode steps, and a float model's larger than the caches (one row, and three rows at
    their own slots as the serving engine steps them), are one quark::decode_layer call a layer, with the logits
    of the decoder's eager steps."""
    import quark.fast as fast

    monkeypatch.setattr(fast, "MATVEC_MIN_BYTES", 0)  # the test model counts as large
    q = _quantized(model, bits)
    weights = FusedWeights(q)
    idx = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(11))
    calls = []
    real = kernels.decode_layer
    monkeypatch.setattr(kernels, "decode_layer", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))

    def logits(kernel: bool, b: int) -> torch.Tensor:
        dec = FastDecoder(q, weights, 3, 20)
        assert dec.kernel_step
        dec.kernel_step = dec.cpu_step = kernel
        out = [dec.prefill_rows(idx[:b, :5], None, 0)]
        for t in range(5, 12):
            out.append(dec.step(idx[:b, t], torch.full((b,), t), t + 1))
        return torch.stack(out)

    with torch.no_grad():
        for b in (1, 3):
            got = logits(True, b)
            assert calls == [b] * 7 * q.config.n_layers
            calls.clear()
            want = logits(False, b)
            assert not calls
            tol = 1e-4 if bits == 32 else 2e-2  # quantized activations in both paths
            assert (got - want).abs().max() <= tol * want.abs().max()
            assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_decode_layer_rejects_bad_operands_with_a_clear_error(model):
    q = _quantized(model, 8)
    w = FusedWeights(q)
    cache = KVCache(q.config, 1, 10)
    x = torch.randn(1, q.config.d_model)
    args, kv = w.kernel_layers[0], (cache.k[0], cache.v[0])
    with pytest.raises(RuntimeError, match=r"slot 10 of row 0 outside \[0, 10\)"):
        kernels.decode_layer(x, args, kv, w.tables, torch.tensor([10]), key_mask=None, n_keys=10)
    with pytest.raises(RuntimeError, match="caches must be contiguous float32"):
        kernels.decode_layer(x, args, (kv[0].bfloat16(), kv[1]), w.tables, torch.tensor([1]), key_mask=None, n_keys=10)
    with pytest.raises(RuntimeError, match=r"x must be a contiguous float32 CPU \(B, D\)"):
        kernels.decode_layer(x.double(), args, kv, w.tables, torch.tensor([1]), key_mask=None, n_keys=10)
    with pytest.raises(RuntimeError, match=r"n_keys must be in \[1, 10\]"):
        kernels.decode_layer(x, args, kv, w.tables, torch.tensor([1]), key_mask=None, n_keys=11)
