"""Fine-tuning a model that is not Quark's own: a tiny Llama folder with its own tokenizer (extra special tokens,
its own chat template, more embedding rows than ids), prepared and trained through the CLI without --config;
LoRA adapters (only they are trained and saved, resume exactly, merge for every reader); the exports checked
against independent loaders: transformers' LlamaForCausalLM, PEFT's PeftModel, llama.cpp when installed."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from quark.cli import main
from quark.config import QuarkConfig
from quark.lora import LORA_TARGETS, LoRALinear, apply_lora, merge_lora
from quark.model import Quark
from quark.tokenizer import Tokenizer
from quark.train.config import TrainConfig
from quark.train.loop import train
from quark.weights import load_model, load_model_and_tokenizer, read_safetensors, save_safetensors, state_dict_for_save

TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
NAMES = ["Anna", "Marco", "Luca", "Sara", "Paolo", "Giulia", "Bob", "Alice"]
FAST = dict(tensorboard=False, plot=False, samples=0, log_every=100, eval_every=0, eval_batches=1)


def foreign_tokenizer(tiny_tokenizer) -> Tokenizer:
    tk = HFTokenizer.from_str(tiny_tokenizer.tk.to_str())
    tk.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(tk, {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE})


def write_llama_folder(folder, tok: Tokenizer, seed: int = 0):
    """An HF LlamaForCausalLM folder as another trainer would ship it: no Quark metadata, padded vocabulary."""
    from quark.hf.export import llama_config_dict

    cfg = dataclasses.replace(QuarkConfig.from_name("test"), vocab_size=tok.vocab_size + 4, context_length=128,
                              tie_embeddings=False)
    model = Quark(cfg).init_weights(seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(llama_config_dict(cfg, tok)))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict_for_save(model).items()}, str(folder / "model.safetensors"))
    tok.save(folder)
    return folder


def chats(n=48):
    return [[{"role": "user", "content": f"Say hello to {NAMES[i % len(NAMES)]}."},
             {"role": "assistant", "content": f"Hello, {NAMES[i % len(NAMES)]}!"}] for i in range(n)]


@pytest.fixture()
def foreign(tmp_path, tiny_tokenizer):
    """(model folder, its tokenizer, an SFT data folder prepared by `quark prepare --sft --tokenizer <model>`)."""
    tok = foreign_tokenizer(tiny_tokenizer)
    base = write_llama_folder(tmp_path / "base", tok)
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats()))
    assert main(["prepare", "--sft", str(jsonl), "--tokenizer", str(base), "--out", str(tmp_path / "data"),
                 "--seq-len", "64", "--val-fraction", "0.1", "--quiet"]) in (0, None)
    return base, tok, tmp_path / "data"


def hf_logits(folder, ids):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def quark_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_prepare_uses_the_models_own_template_and_sft_defaults(foreign, tmp_path, capsys):
    base, tok, data = foreign
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == tok.sha256() and manifest["seq_len"] == 64
    import numpy as np

    ids = np.load(data / "train" / "sft_00000.ids.npy")
    mask = np.load(data / "train" / "sft_00000.mask.npy")
    row, m = ids[0].tolist(), mask[0].tolist()
    rendered = [tok.render_chat(c) for c in chats()]  # the model's template: <s>[user] ...\n[assistant] ...</s>
    want, want_mask = next(r for r in rendered if row[:len(r[0])] == r[0])  # rows start with a whole conversation
    assert row[0] == tok.bos_id and m[:len(want)] == want_mask
    assert tok.eos_id in [i for i, k in zip(want, want_mask) if k]  # the turn's closing token is trained
    assert main(["sft", "--from", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["lr"], cfg["lora_rank"]) == (2e-5, 0)
    assert main(["sft", "--from", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--set", "lora_rank=4", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["lr"], cfg["lora_rank"]) == (2e-4, 4)


def test_full_sft_from_a_foreign_model_exports_equal_logits(foreign, tmp_path):
    base, tok, data = foreign
    run = tmp_path / "run"
    assert main(["sft", "--from", str(base), "--data", str(data), "--out", str(run), "--set", "max_steps=6",
                 "--set", "lr=3e-3", *[f"--set={k}={json.dumps(v)}" for k, v in FAST.items()]]) == 0
    model, got = load_model_and_tokenizer(run)
    assert got.sha256() == tok.sha256() and got.stop_ids == tok.stop_ids and got.chat_template == TEMPLATE
    before = load_model(base)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)
    assert main(["export", "--checkpoint", str(run), "--format", "llama", "--out", str(tmp_path / "hf")]) in (0, None)
    ids = tok.render_prompt([{"role": "user", "content": "Say hello to Bob."}])
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), quark_logits(model, ids), atol=1e-5, rtol=0)


def lora_run(base, data, out, **kw):
    cfg = dict(kind="sft", data=str(data), base=str(base), out=str(out), batch_size=4, lr=1e-2, min_lr=1e-3,
               warmup_steps=1, lora_rank=4, lora_alpha=8.0, **FAST)
    cfg.update(kw)
    return train(TrainConfig(**cfg))


def test_lora_trains_only_adapters_saves_only_them_and_resumes_exactly(foreign, tmp_path):
    base, tok, data = foreign
    base_bytes = (base / "model.safetensors").read_bytes()
    lora_run(base, data, tmp_path / "a", max_steps=4, save_every=2)
    step4 = tmp_path / "a" / "checkpoints" / "step_000004"
    assert sorted(p.name for p in step4.iterdir() if "token" not in p.name) == [
        "adapter.safetensors", "config.json", "lora.json", "train_state.json", "train_state.safetensors"]
    adapters = read_safetensors(step4 / "adapter.safetensors")
    assert len(adapters) == 2 * len(LORA_TARGETS) * 2  # layers x targets x (A, B)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapters)
    assert any(float(v.abs().max()) > 0 for k, v in adapters.items() if "lora_B" in k)  # B moved off zero
    assert (base / "model.safetensors").read_bytes() == base_bytes
    state = read_safetensors(step4 / "train_state.safetensors")
    assert all(".lora_" in k for k in state if k.startswith("exp_avg."))  # optimizer state: adapters only
    lora = json.loads((step4 / "lora.json").read_text())
    assert lora["base"] == str(base.resolve()) and lora["rank"] == 4 and lora["alpha"] == 8.0
    shutil.rmtree(step4)  # resume from step 2: the same adapters at step 4
    lora_run(base, data, tmp_path / "a", max_steps=4, save_every=2)
    again = read_safetensors(step4 / "adapter.safetensors")
    assert all(torch.equal(adapters[k], again[k]) for k in adapters)
    with pytest.raises(ValueError, match="holds LoRA adapters, but lora_rank=0"):
        lora_run(base, data, tmp_path / "a", max_steps=6, lora_rank=0)


def test_lora_merges_for_every_reader_and_peft_loads_the_adapters(foreign, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, tok, data = foreign
    lora_run(base, data, tmp_path / "run", max_steps=5)
    merged, _ = load_model_and_tokenizer(tmp_path / "run")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    ids = tok.render_prompt([{"role": "user", "content": "Say hello to Sara."}])
    ours = quark_logits(merged, ids)
    assert (ours - quark_logits(load_model(base), ids)).abs().max() > 1e-3  # the adapters change the model
    main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "llama", "--out", str(tmp_path / "llama")])
    torch.testing.assert_close(hf_logits(tmp_path / "llama", ids), ours, atol=1e-5, rtol=0)
    main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "peft", "--out", str(tmp_path / "peft")])
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8.0)
    hf = transformers.LlamaForCausalLM.from_pretrained(cfg["base_model_name_or_path"], torch_dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert main(["export", "--checkpoint", str(base), "--format", "peft", "--out", str(tmp_path / "p2")]) == 2
    assert "base: not a LoRA checkpoint (no lora.json)" in capsys.readouterr().err


def test_lora_gguf_export_matches_llama_cpp(foreign, tmp_path):
    pytest.importorskip("gguf")
    base, tok, data = foreign
    lora_run(base, data, tmp_path / "run", max_steps=3)
    out = tmp_path / "m.gguf"
    main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out", str(out)])
    assert out.stat().st_size > 0
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: the merged GGUF was written "
                                    "but not run through llama.cpp")
    import numpy as np

    merged, _ = load_model_and_tokenizer(tmp_path / "run")
    ids = tok.render_prompt([{"role": "user", "content": "Say hello to Bob."}])
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    np.testing.assert_allclose(np.array(llm.scores[:len(ids)])[:, :merged.config.vocab_size],
                               quark_logits(merged, ids).numpy(), atol=1e-3, rtol=0)


def test_lora_layer_matches_peft_and_merges(tiny_tokenizer):
    """LoRALinear against PEFT's own LoRA layer on the same weights (before merging), and the merged model."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = Quark(QuarkConfig.from_name("test")).init_weights(0)
    apply_lora(model, 4, 16.0, seed=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    idx = torch.randint(0, 500, (2, 12))
    x = torch.randn(3, 64)
    layer = model.model.layers[1].mlp.up_proj
    ref = peft.tuners.lora.Linear(torch.nn.Linear(64, 128, bias=False), "default", config=peft.LoraConfig(r=4, lora_alpha=16),
                                  r=4, lora_alpha=16)
    with torch.no_grad():
        ref.base_layer.weight.copy_(layer.base_layer.weight)
        ref.lora_A["default"].weight.copy_(layer.lora_A.weight)
        ref.lora_B["default"].weight.copy_(layer.lora_B.weight)
        torch.testing.assert_close(layer(x), ref(x), atol=1e-6, rtol=0)
        before = model(idx)
        merge_lora(model)
        torch.testing.assert_close(model(idx), before, atol=1e-5, rtol=0)


def test_frozen_head_loss_gives_the_same_input_gradient():
    """With the head frozen (LoRA) the chunked loss skips its (vocab x d) weight gradient, not the input's."""
    model = Quark(QuarkConfig.from_name("test")).init_weights(0)
    idx, tgt = torch.randint(0, 500, (2, 10)), torch.randint(0, 500, (2, 10))
    grads = []
    for frozen in (False, True):
        model.zero_grad(set_to_none=True)
        model.lm_head.weight.requires_grad_(not frozen)
        model.loss(idx, tgt, chunk_rows=7).backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
        assert (model.lm_head.weight.grad is None) == frozen
    torch.testing.assert_close(grads[0], grads[1])


def test_lora_config_errors(foreign, tmp_path):
    base, tok, data = foreign
    with pytest.raises(ValueError, match=r"lora_rank=4: trains with optimizer='adamw' only"):
        TrainConfig(kind="sft", lora_rank=4, optimizer="muon")
    with pytest.raises(ValueError, match=r"lora_rank=4: applies to SFT runs only"):
        TrainConfig(kind="pretrain", lora_rank=4)
    with pytest.raises(ValueError, match=r"lora_targets=\['qkv'\]: allowed names .*q_proj, k_proj"):
        TrainConfig(kind="sft", lora_rank=4, lora_targets=["qkv"])
    lora_run(base, data, tmp_path / "run", max_steps=1)
    bad = load_model(base)  # the base changes under the adapters: loading them is refused, naming the base
    with torch.no_grad():
        bad.model.norm.weight.add_(1.0)
    save_safetensors(state_dict_for_save(bad), base / "model.safetensors")
    with pytest.raises(ValueError, match=r"lora.json: base model .*base has weights .* not the same base model"):
        load_model(tmp_path / "run")
