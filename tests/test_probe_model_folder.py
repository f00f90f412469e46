"""Issue 36's probes of model folders (finding 5), one test per case; each failed on the code before its fix:
config.json that is not an object or lacks a Llama config's fields, a same-size tokenizer with its ids shuffled,
finite weights that overflow the activations, and `quark export --out <the source> --force`."""

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from quark.cli import main
from quark.config import PRESETS
from quark.model import Quark
from quark.weights import load_for_inference, save_model, save_safetensors, state_dict_for_save


@pytest.fixture
def folder(tmp_path, tiny_tokenizer):
    return save_model(Quark(PRESETS["test"]).init_weights(0), tmp_path / "m", tokenizer=tiny_tokenizer)


COMMANDS = (["chat", "--model"], ["eval", "--tasks", "piqa", "--limit", "2", "--model"],
            ["export", "--out", "EXPORT", "--checkpoint"], ["serve", "--engine", "thread", "--port", "0", "--model"])


def run_commands(folder, tmp_path, capsys) -> list[str]:
    errs = []
    for argv in COMMANDS:
        argv = [a.replace("EXPORT", str(tmp_path / "export")) for a in argv] + [str(folder)]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"quark {argv[0]}: error: ") and err.count("\n") == 1, err
        errs.append(err)
    return errs


@pytest.mark.parametrize("content", [[1, 2], "llama", 3])
def test_probe_config_json_not_an_object(folder, tmp_path, capsys, content):
    """config.json holding [1,2]: an AttributeError traceback in chat/eval/export/serve."""
    pytest.importorskip("uvicorn")
    (folder / "config.json").write_text(json.dumps(content))
    for err in run_commands(folder, tmp_path, capsys):
        assert "config.json: expected a JSON object" in err


def test_probe_config_json_llama_without_fields(folder, tmp_path, capsys):
    """{"model_type": "llama"}: KeyError 'num_attention_heads' tracebacks."""
    pytest.importorskip("uvicorn")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for err in run_commands(folder, tmp_path, capsys):
        assert "a Llama config needs hidden_size, num_hidden_layers, num_attention_heads" in err


def test_probe_shuffled_tokenizer_of_the_same_size(folder, tiny_tokenizer):
    """A different tokenizer of the same size (ids shuffled) was accepted and the model talked nonsense."""
    data = json.loads(tiny_tokenizer.tk.to_str())
    vocab = data["model"]["vocab"]
    names = sorted(vocab, key=vocab.get)
    ids = sorted(vocab.values())
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(ids) - 1, generator=g).tolist()  # id 0 (<|endoftext|>) stays
    data["model"]["vocab"] = {names[0]: ids[0], **{names[1 + p]: ids[1 + i] for i, p in enumerate(perm)}}
    shuffled = HFTokenizer.from_str(json.dumps(data))
    assert shuffled.get_vocab_size() == tiny_tokenizer.vocab_size
    (folder / "tokenizer.json").write_text(shuffled.to_str())
    with pytest.raises(ValueError, match=r"tokenizer.json: sha256 .* is not the tokenizer these weights were trained "
                                         r"with"):
        load_for_inference(folder, "cpu")


def test_probe_weights_that_overflow(folder):
    """Weights holding 3e38 (finite, hash recomputed) chatted empty replies with rc 0."""
    model = Quark(PRESETS["test"]).init_weights(0)
    sd = state_dict_for_save(model)
    sd["model.layers.0.mlp.down_proj.weight"] = torch.full_like(sd["model.layers.0.mlp.down_proj.weight"], 3e38)
    save_safetensors(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the weights overflow in layer 0 \(activations reach Inf/NaN"):
        load_for_inference(folder, "cpu")


@pytest.mark.parametrize("fmt", ["hf", "llama"])
def test_probe_export_over_the_source(folder, capsys, fmt):
    """`quark export --out <the source folder> --force` overwrote the source (card shrank, eval results lost).
    (A GGUF export's --out must end in .gguf, so it can never name the source folder.)"""
    (folder / "eval_results.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for out in (folder, folder.parent):
        argv = ["export", "--checkpoint", str(folder), "--out", str(out), "--force", "--format", fmt]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "would replace the model being read" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    shutil.rmtree(folder)
