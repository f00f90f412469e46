"""Safe weights: safetensors + JSON only, clear errors for truncated, mismatched or pickle files."""

import json

import pytest
import torch

from quark import Quark
from quark.config import PRESETS
from quark.weights import load_model, load_model_and_tokenizer, resolve_model_path, save_model


@pytest.fixture()
def saved(tmp_path):
    model = Quark(PRESETS["test"]).init_weights(seed=0)
    save_model(model, tmp_path / "m")
    return model, tmp_path / "m"


def test_round_trip_is_exact(saved):
    model, folder = saved
    loaded = load_model(folder)
    idx = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_truncated_file_is_named(saved):
    _, folder = saved
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(folder)


def test_shape_mismatch_names_tensor_and_shapes(saved):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["d_ff"] = 192
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(128, 64\), the config expects \(192, 64\)"):
        load_model(folder)


def test_pickle_is_refused(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["test"].to_dict()))
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path / "pytorch_model.bin")


def test_missing_config_and_unknown_field(saved):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_experts": 8}))
    with pytest.raises(ValueError, match="n_experts"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(folder)


def test_run_folder_resolves_to_newest_checkpoint(tmp_path):
    model = Quark(PRESETS["test"]).init_weights(seed=0)
    for step in (5, 10):
        save_model(model, tmp_path / "run" / "checkpoints" / f"step_{step:06d}")
    assert resolve_model_path(tmp_path / "run").name == "step_000010"


def test_tokenizer_vocab_mismatch_fails_before_loading(saved, tiny_tokenizer):
    _, folder = saved
    tiny_tokenizer.save(folder)
    model, tok = load_model_and_tokenizer(folder)
    assert tok.vocab_size == model.config.vocab_size == 514
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 600}))
    with pytest.raises(ValueError, match="tokenizer has 514 ids"):
        load_model_and_tokenizer(folder)
