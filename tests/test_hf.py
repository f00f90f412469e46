"""The HF export: the card's files, its Quickstart run verbatim, generate()/pipelines/labels, the way back."""

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quark import Quark  # noqa: E402
from quark.config import PRESETS  # noqa: E402
from quark.generate import generate_text  # noqa: E402
from quark.hf.export import RECOMMENDED, export  # noqa: E402
from quark.weights import load_model, load_model_and_tokenizer, read_safetensors, save_model  # noqa: E402

# The Quark-72M model card's Quickstart as users copy it, verbatim except the two repository names (filled in by
# the test).
SPEC_QUICKSTART = '''
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("ThingAI/Quark2Tokenizer")
tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

model = AutoModelForCausalLM.from_pretrained(
    "ThingAI/Quark-72M-Instruct",
    trust_remote_code=True,
    dtype=torch.bfloat16,   # or torch.float32 on CPU
).eval()

prompt = "<|im_start|>user\\nWhat is the difference between a list and a tuple in Python?<|im_end|>\\n<|im_start|>assistant\\n"
input_ids = tokenizer.encode(prompt, add_special_tokens=False, return_tensors="pt")

output_ids = model.generate_text(
    input_ids,
    max_new_tokens=200,
    temperature=0.2,
    top_p=0.9,
    rep_penalty=1.15,
    eos_token_id=im_end_id,
)

response = tokenizer.decode(output_ids[0][input_ids.shape[1]:], skip_special_tokens=True)
print(response)
'''  # noqa: E501 (the card's prompt line, verbatim)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    # context 256 so the card's max_new_tokens=200 fits; larger init so greedy paths are not degenerate
    cfg = PRESETS["test"].replace(context_length=256, init_std=0.3)
    model = Quark(cfg).init_weights(seed=7).eval()
    folder = tmp_path_factory.mktemp("ck") / "step_000010"
    save_model(model, folder)
    tiny_tokenizer.save(folder)
    return model, folder


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    _, folder = checkpoint
    out = tmp_path_factory.mktemp("hf") / "quark-test"
    return export(folder, out, repo_id=str(out))


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(exported):
    return transformers.AutoTokenizer.from_pretrained(exported)


def test_folder_has_the_cards_files(exported, checkpoint):
    model, _ = checkpoint
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "configuration_quark.py", "modeling_quark.py", "model.py", "model.safetensors",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "LICENSE"} <= names
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_quark.QuarkForCausalLM"}
    assert cfg["model_type"] == "llama"  # AutoConfig/AutoTokenizer need no custom code
    assert cfg["quark"] == model.config.to_dict()
    gen = json.loads((exported / "generation_config.json").read_text())
    assert RECOMMENDED == {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.15, "max_new_tokens": 200}
    assert {k: gen[k] for k in ("temperature", "top_p", "repetition_penalty")} == {
        "temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.15}
    # max_new_tokens in the file would override callers' max_length (lm-eval's); cap at the context instead
    assert "max_new_tokens" not in gen and gen["max_length"] == model.config.context_length
    assert gen["eos_token_id"] == model.config.vocab_size - 1
    tc = json.loads((exported / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"]
    assert all(t.dtype == torch.float32 for t in read_safetensors(exported / "model.safetensors").values())
    assert (exported / "LICENSE").read_text().startswith("MIT License")
    # the transformer is model.py copied verbatim: one implementation
    import quark.model

    assert (exported / "model.py").read_text() == Path(quark.model.__file__).read_text()
    assert "class Attention" not in (exported / "modeling_quark.py").read_text()


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_remote_code_is_exactly_the_model_and_imports_only_torch_transformers_and_siblings(exported):
    shipped = sorted(f.name for f in exported.glob("*.py"))
    assert shipped == ["config.py", "configuration_quark.py", "generate.py", "model.py", "modeling_quark.py",
                       "sampling.py"]
    allowed = set(sys.stdlib_module_names) | {"__future__", "torch", "transformers"}
    for f in exported.glob("*.py"):
        bad = set(_imports(f)) - allowed
        assert not bad, f"{f.name} imports {bad}"
        for rel in re.findall(r"^\s*from\s+\.(\S+)\s+import", f.read_text(), flags=re.MULTILINE):
            assert f"{rel}.py" in shipped, f"{f.name} imports .{rel}, which the folder lacks"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_card_quickstart_runs_verbatim(exported, checkpoint, dtype, capsys):
    code = SPEC_QUICKSTART.replace("ThingAI/Quark2Tokenizer", str(exported))
    code = code.replace("ThingAI/Quark-72M-Instruct", str(exported))
    if dtype == "float32":  # the card's own alternative: "or torch.float32 on CPU"
        code = code.replace("dtype=torch.bfloat16,", "dtype=torch.float32,")
    ns = {}
    torch.manual_seed(0)
    exec(compile(code, "quickstart", "exec"), ns)
    model, _ = checkpoint
    out, prompt_ids = ns["output_ids"], ns["input_ids"]
    assert ns["model"].dtype == getattr(torch, dtype)
    assert ns["im_end_id"] == model.config.vocab_size - 1
    assert out.shape[0] == 1 and out.shape[1] > prompt_ids.shape[1]
    # transformers 5 asks before running a folder's config code for AutoTokenizer too; without a terminal
    # (as here) it falls back to the plain tokenizer files, so only the response line is ours
    assert capsys.readouterr().out.endswith(ns["response"] + "\n")
    if dtype == "float32":  # same seed, same sampler: exactly quark's own generate_text
        torch.manual_seed(0)
        ref = generate_text(model, prompt_ids, max_new_tokens=200, temperature=0.2, top_p=0.9, rep_penalty=1.15,
                            eos_token_id=model.config.vocab_size - 1)
        assert out.tolist() == ref.tolist()


def test_generated_readme_quickstart_runs(exported):
    readme = (exported / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'    "{exported}",' in block  # repo_id given at export
    ns = {}
    exec(compile(block, "README quickstart", "exec"), ns)
    assert ns["output_ids"].shape[1] > ns["input_ids"].shape[1]


def test_forward_logits_and_labels_loss_equal_quarks(hf_model, checkpoint):
    model, _ = checkpoint
    idx = torch.randint(0, 514, (2, 17), generator=torch.Generator().manual_seed(1))
    out = hf_model(idx)
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    with torch.no_grad():
        assert torch.equal(out.logits, model(idx))
        labels = idx.clone()
        labels[0, :5] = -100
        loss = hf_model(idx, labels=labels).loss
        targets = labels[:, 1:]
        ref = model.loss(idx[:, :-1], targets)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rep", [1.0, 1.15])
def test_hf_generate_equals_generate_text_greedy(hf_model, rep):
    prompt = torch.randint(1, 512, (1, 11), generator=torch.Generator().manual_seed(2))
    ours = hf_model.generate_text(prompt, max_new_tokens=24, temperature=0.0, rep_penalty=rep)
    theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               repetition_penalty=rep, max_new_tokens=24, eos_token_id=None)
    assert theirs.tolist() == ours.tolist()
    assert len(set(ours[0, 11:].tolist())) > 1  # not a degenerate one-token loop


def test_hf_generate_left_padded_batch(hf_model, hf_tok, checkpoint):
    model, _ = checkpoint
    texts = ["def main():\n    return", "Ciao"]
    hf_tok.padding_side = "left"
    enc = hf_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = hf_model.generate(**enc, do_sample=False, max_new_tokens=10, eos_token_id=None)
    T = enc["input_ids"].shape[1]
    for row, text in zip(out, texts):
        ids = torch.tensor([hf_tok.encode(text, add_special_tokens=False)])
        ref = generate_text(model, ids, max_new_tokens=10, temperature=0.0)
        assert row[T:].tolist() == ref[0, ids.shape[1]:].tolist()


def test_pipeline_text_generation(hf_model, hf_tok, checkpoint):
    model, _ = checkpoint
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tok)
    prompt = "import os\n"
    got = pipe(prompt, do_sample=False, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    ids = torch.tensor([hf_tok.encode(prompt, add_special_tokens=False)])
    # greedy, with generation_config.json's recommended repetition penalty (the same rule as rep_penalty)
    ref = generate_text(model, ids, max_new_tokens=8, temperature=0.0, rep_penalty=RECOMMENDED["repetition_penalty"])
    assert got == hf_tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_template_matches_quarks_renderer(hf_tok, tiny_tokenizer):
    msgs = [{"role": "user", "content": "Qual è la capitale d'Italia?"}]
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tiny_tokenizer.render_prompt(msgs)


def test_round_trip_checkpoint_export_load(exported, checkpoint):
    model, _ = checkpoint
    back, tok = load_model_and_tokenizer(exported)
    idx = torch.randint(0, 514, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))
    assert tok.vocab_size == model.config.vocab_size


def test_save_pretrained_folder_loads_back_into_quark(hf_model, checkpoint, tmp_path):
    model, _ = checkpoint
    hf_model.save_pretrained(tmp_path / "ft")
    back = load_model(tmp_path / "ft")
    idx = torch.randint(0, 514, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))


def test_llama_format_loads_without_remote_code(checkpoint, tmp_path):
    model, folder = checkpoint
    out = export(folder, tmp_path / "llama", fmt="llama")
    assert not list(out.glob("*.py"))
    llama = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    readme = (out / "README.md").read_text()  # its card's Quickstart runs as written
    exec(compile(readme.split("```python\n", 1)[1].split("```", 1)[0].replace('"llama"', f'"{out}"'), "qs", "exec"), {})
    idx = torch.randint(0, 514, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(llama(idx).logits, model(idx), rtol=1e-5, atol=1e-5)
        assert torch.equal(load_model(out)(idx), model(idx))  # and quark loads the Llama folder back
    llama.save_pretrained(tmp_path / "saved")  # a Llama folder written by transformers itself
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "saved")(idx), model(idx))


def test_beam_search_and_no_cache_match_the_llama_oracle(hf_model, checkpoint, tmp_path):
    _, folder = checkpoint
    llama = transformers.LlamaForCausalLM.from_pretrained(export(folder, tmp_path / "l", fmt="llama")).eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    kw = {"attention_mask": torch.ones_like(prompt), "do_sample": False, "max_new_tokens": 10,
          "repetition_penalty": 1.0, "eos_token_id": None}
    beams = hf_model.generate(prompt, num_beams=3, **kw)  # the cache is reordered between beams
    assert beams.tolist() == llama.generate(prompt, num_beams=3, **kw).tolist()
    assert hf_model.generate(prompt, use_cache=False, **kw).tolist() == llama.generate(prompt, **kw).tolist()
    assert isinstance(hf_model(prompt, return_dict=False), tuple)


def test_context_overflow_is_a_clear_error(hf_model):
    prompt = torch.ones(1, 250, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's context_length=256"):
        hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
                          eos_token_id=None)


def test_lm_evaluation_harness_scores_and_generates(exported, checkpoint):
    """lm-eval's HFLM (`--model hf --model_args pretrained=DIR,trust_remote_code=True`) on the folder: its
    log-likelihoods are quark's, and generate_until honours max_gen_toks."""
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    model, _ = checkpoint
    lm = huggingface.HFLM(pretrained=str(exported), trust_remote_code=True, batch_size=2, device="cpu",
                          dtype="float32")
    pairs = [("def main():", " return 1"), ("Ciao, come", " stai?"), ("x = [1, 2", ", 3]")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, _) in zip(pairs, got):
        c, k = lm._encode_pair(ctx, cont)
        ids = torch.tensor([c + k])
        with torch.no_grad():
            logp = model(ids[:, :-1]).log_softmax(-1)[0, len(c) - 1:]
        assert ll == pytest.approx(logp.gather(-1, torch.tensor(k)[:, None]).sum().item(), abs=1e-4)
    out = lm.generate_until([Instance("generate_until", {}, ("def main():", {"until": ["<<stop>>"],
                                                                            "max_gen_toks": 6}), 0)])[0]
    ids = torch.tensor([lm.tok_encode("def main():")])
    ref = generate_text(model, ids, max_new_tokens=6, temperature=0.0, rep_penalty=RECOMMENDED["repetition_penalty"])
    assert out == lm.tok_decode(ref[0, ids.shape[1]:].tolist())


def test_bad_inputs_name_file_and_field(exported, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
    with pytest.raises(ValueError, match=r"hidden_size=96 disagrees with quark.d_model=64"):
        transformers.AutoModelForCausalLM.from_pretrained(bad, trust_remote_code=True)
    (bad / "config.json").write_text(json.dumps({**cfg, "quark": {**cfg["quark"], "d_ff": 96},
                                                 "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape"):
        load_model(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_model_and_tokenizer(bad)
    torch.save({}, bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickle"):
        load_model(bad)


def test_cli_export_and_errors(checkpoint, tmp_path, capsys):
    from quark.cli import main

    _, folder = checkpoint
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "modeling_quark.py").exists()
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "not empty (pass --force" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "o"), "--force"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "p")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.gpu
def test_running_on_gpu_lines(exported):
    # the card's "Running on GPU" lines, then the Quickstart's generate_text call
    model = transformers.AutoModelForCausalLM.from_pretrained(
        exported, trust_remote_code=True, dtype=torch.bfloat16).cuda().eval()
    input_ids = torch.tensor([[1, 2, 3, 4]])
    input_ids = input_ids.cuda()
    out = model.generate_text(input_ids, max_new_tokens=20, temperature=0.2, top_p=0.9, rep_penalty=1.15)
    assert out.is_cuda and out.shape == (1, 24)
    # fp32 on the GPU: transformers' generate() (eager path, DynamicCache) and generate_text (quark's decode
    # loop) pick the same greedy tokens; bf16 rounding differs between those kernels, so compare in fp32
    model = model.float()
    greedy = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=20, eos_token_id=None, repetition_penalty=1.0)
    assert greedy.tolist() == model.generate_text(input_ids, max_new_tokens=20, temperature=0.0).tolist()
