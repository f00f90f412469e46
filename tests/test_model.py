"""The model against an independent oracle: HF LlamaForCausalLM on the same random weights."""

import pytest
import torch

from quark import KVCache, Quark, QuarkConfig
from quark.config import PRESETS

transformers = pytest.importorskip("transformers")


def llama_twin(model: Quark):
    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.context_length, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = PRESETS["test"].replace(n_layers=3)
    model = Quark(cfg).init_weights(seed=1).eval()
    # make the norms non-trivial so a wrong norm placement would show
    with torch.no_grad():
        for _n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model, llama_twin(model)


def test_full_forward_matches_llama(pair):
    model, hf = pair
    idx = torch.randint(0, model.config.vocab_size, (2, 37))
    with torch.no_grad():
        ours, ref = model(idx), hf(idx).logits
    assert ours.shape == (2, 37, model.config.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_prefill_then_cached_decode_matches_llama(pair):
    model, hf = pair
    idx = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        ref = hf(idx).logits
        cache = KVCache(model.config, 2, 30)
        got = [model(idx[:, :20], cache, torch.arange(20))]
        for t in range(20, 30):
            got.append(model(idx[:, t:t + 1], cache, torch.tensor([t])))
    assert (torch.cat(got, 1) - ref).abs().max().item() <= 1e-4


def test_per_row_positions_match_shared_positions(pair):
    model, _ = pair
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        a = model(idx, KVCache(model.config, 2, 16), torch.arange(12))
        b = model(idx, KVCache(model.config, 2, 16), torch.arange(12).expand(2, 12))
    assert torch.allclose(a, b, atol=1e-5)


def test_chunked_loss_matches_full_cross_entropy(pair):
    model, _ = pair
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    tgt = torch.randint(0, model.config.vocab_size, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.uint8)
    mask[0, :5] = 0
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(idx)[mask.bool()], tgt[mask.bool()])
        chunked = model.loss(idx, tgt, loss_mask=mask, chunk_rows=7)
    assert torch.allclose(full, chunked, atol=1e-5)


def test_quark_72m_shape_is_the_cards():
    c = QuarkConfig.from_name("quark-72m")
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (14, 512, 8, 2, 64, 1344)
    assert (c.vocab_size, c.context_length, c.rope_theta, c.tie_embeddings) == (65538, 2048, 10000.0, True)
    assert c.n_params() == 71_646_720
    with torch.device("meta"):
        assert Quark(c).n_params() == 71_646_720
    assert c.kv_cache_bytes_per_token(bytes_per_elem=2) == 2 * 14 * 2 * 64 * 2


@pytest.mark.parametrize("field,kw", [
    ("n_heads", dict(d_model=100, n_heads=8)),
    ("n_kv_heads", dict(n_heads=8, n_kv_heads=3)),
    ("vocab_size", dict(vocab_size=2)),
    ("context_length", dict(context_length=0)),
])
def test_bad_config_names_the_field(field, kw):
    with pytest.raises(ValueError, match=field):
        PRESETS["test"].replace(**kw)
