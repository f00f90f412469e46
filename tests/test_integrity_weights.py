"""Integrity of weights: the SHA-256 Quark records in every safetensors file it writes (checked against hashlib over
the file's own bytes), flipped bytes, NaN tensors and truncated files refused at load with the file and tensor
named, folders written by others loaded unverified but checked, and `QUARK_NO_VERIFY` skipping the hash only."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quark.config import PRESETS
from quark.model import Quark
from quark.weights import HASH_KEY, load_model, read_safetensors, save_model, save_safetensors, state_dict_for_save


def header(path) -> tuple[dict, int]:
    """(safetensors JSON header, offset of the data section), parsed by hand from the file's bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), 8 + n


def independent_sha256(path) -> str:
    """The documented hash, recomputed from the file's bytes without torch: per tensor in name order,
    `name|dtype|shape\\n` then its bytes."""
    head, start = header(path)
    raw, h = path.read_bytes(), hashlib.sha256()
    dtypes = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "U8": "uint8"}
    for name in sorted(k for k in head if k != "__metadata__"):
        t = head[name]
        lo, hi = t["data_offsets"]
        h.update(f"{name}|{dtypes[t['dtype']]}|{list(t['shape'])}\n".encode())
        h.update(raw[start + lo:start + hi])
    return h.hexdigest()


def flip_mantissa_bytes(path, tensor: str, n: int = 64) -> None:
    """XOR the low byte of n float32 values of `tensor` in place: the values stay finite, the hash must not."""
    head, start = header(path)
    lo = start + head[tensor]["data_offsets"][0]
    with open(path, "r+b") as f:
        for k in range(n):
            f.seek(lo + 4 * k)
            b = f.read(1)
            f.seek(lo + 4 * k)
            f.write(bytes([b[0] ^ 0x5A]))


@pytest.fixture
def model_dir(tmp_path):
    m = Quark(PRESETS["test"]).init_weights(0)
    return save_model(m, tmp_path / "m"), m


def test_saved_files_record_the_sha256_of_their_bytes(model_dir, tmp_path):
    folder, m = model_dir
    f = folder / "model.safetensors"
    meta = header(f)[0]["__metadata__"]
    assert meta["format"] == "pt" and meta[HASH_KEY] == independent_sha256(f)
    bf16 = save_model(m, tmp_path / "bf16", dtype=torch.bfloat16) / "model.safetensors"
    assert header(bf16)[0]["__metadata__"][HASH_KEY] == independent_sha256(bf16)
    loaded = load_model(folder)
    for k, v in state_dict_for_save(m).items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_flipped_bytes_are_refused_naming_the_file(model_dir, monkeypatch):
    folder, m = model_dir
    f = folder / "model.safetensors"
    flip_mantissa_bytes(f, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=rf"^{f}: content hash mismatch .*the file is corrupt"):
        load_model(folder)
    monkeypatch.setenv("QUARK_NO_VERIFY", "1")  # the escape hatch skips the hash, so the bad bytes come through
    bad = load_model(folder)
    assert not torch.equal(bad.model.layers[0].mlp.up_proj.weight, m.model.layers[0].mlp.up_proj.weight)


def test_a_flipped_recorded_hash_or_header_is_refused(model_dir):
    folder, _ = model_dir
    f = folder / "model.safetensors"
    raw = bytearray(f.read_bytes())
    i = raw.index(HASH_KEY.encode()) + len(HASH_KEY) + 3  # first hex digit of the recorded hash
    raw[i] = ord("0") if raw[i] != ord("0") else ord("1")
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="content hash mismatch"):
        read_safetensors(f)


def test_truncated_file_is_refused(model_dir):
    folder, _ = model_dir
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=rf"^{f}: not a readable safetensors file \(truncated or corrupt\?\)"):
        load_model(folder)


def test_nan_tensor_is_refused_at_load_even_with_a_matching_hash(model_dir, monkeypatch):
    folder, m = model_dir
    sd = state_dict_for_save(m)
    sd["model.embed_tokens.weight"][3, 5] = float("nan")
    sd["model.embed_tokens.weight"][7, 1] = float("inf")
    f = folder / "model.safetensors"
    save_file(sd, str(f), metadata={"format": "pt"})  # written by another tool: no hash
    f2 = folder.parent / "hashed.safetensors"
    save_file(sd, str(f2), metadata={"format": "pt"})
    save_file(sd, str(f2), metadata={"format": "pt", HASH_KEY: independent_sha256(f2)})  # a valid hash of NaNs
    monkeypatch.setenv("QUARK_NO_VERIFY", "1")  # the NaN check stays on without the hash
    for path in (f, f2):
        with pytest.raises(ValueError, match=rf"^{path}: tensor model.embed_tokens.weight holds 2 non-finite "
                                             r"value\(s\) \(NaN/Inf\)"):
            read_safetensors(path)
    with pytest.raises(ValueError, match="model.embed_tokens.weight holds 2 non-finite"):
        load_model(folder)


def test_nan_tensors_are_never_saved(tmp_path):
    good = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.ones(3)}, good)
    before = good.read_bytes()
    with pytest.raises(ValueError, match=rf"^{good}: tensor b holds 1 non-finite"):
        save_safetensors({"a": torch.ones(3), "b": torch.tensor([1.0, float("-inf")])}, good)
    assert good.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_folders_written_by_others_load_unverified_but_checked(model_dir, tmp_path):
    """An HF Llama folder (transformers' own save_pretrained) has no Quark hash: it loads, and NaN is refused."""
    pytest.importorskip("transformers")
    _, m = model_dir
    from tests.test_model import llama_twin

    hf = llama_twin(m)
    out = tmp_path / "llama"
    hf.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert HASH_KEY not in (f.metadata() or {})
    ours = load_model(out)
    x = torch.randint(0, m.config.vocab_size, (1, 9))
    torch.testing.assert_close(ours(x), m(x))
    sd = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tensor model.norm.weight holds 1 non-finite"):
        load_model(out)


def test_hf_export_records_the_hash_and_transformers_still_loads_it(model_dir, tmp_path, tiny_tokenizer):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    from quark.hf.export import export

    folder, m = model_dir
    m2 = Quark(PRESETS["test"].replace(vocab_size=tiny_tokenizer.vocab_size)).init_weights(1)
    save_model(m2, folder)
    tiny_tokenizer.save(folder)
    out = export(folder, tmp_path / "llama", fmt="llama")
    f = out / "model.safetensors"
    assert header(f)[0]["__metadata__"][HASH_KEY] == independent_sha256(f)
    hf = LlamaForCausalLM.from_pretrained(out)
    x = torch.randint(0, m2.config.vocab_size, (1, 7))
    torch.testing.assert_close(hf(x).logits, m2(x), atol=1e-5, rtol=1e-4)
    flip_mantissa_bytes(f, "model.norm.weight", n=4)
    with pytest.raises(ValueError, match=f"{f}: content hash mismatch"):
        load_model(out)


def test_gguf_export_writes_a_sha256_beside_it(model_dir, tmp_path, tiny_tokenizer):
    pytest.importorskip("gguf")
    from quark.hf.gguf_export import export_gguf, verify_gguf

    folder, _ = model_dir
    save_model(Quark(PRESETS["test"].replace(vocab_size=tiny_tokenizer.vocab_size)).init_weights(1), folder)
    tiny_tokenizer.save(folder)
    out = export_gguf(folder, tmp_path / "m.gguf")
    side = tmp_path / "m.gguf.sha256"
    assert side.read_text() == f"{hashlib.sha256(out.read_bytes()).hexdigest()}  m.gguf\n"  # sha256sum -c format
    verify_gguf(out)
    raw = bytearray(out.read_bytes())
    raw[-5] ^= 0xFF
    out.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{out}: content hash mismatch"):
        verify_gguf(out)


def test_hash_uses_little_endian_bytes_as_numpy_sees_them():
    """The recorded hash of a known tensor, computed here with numpy only."""
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    from quark.weights import tensors_sha256

    want = hashlib.sha256(b"w|float32|[2, 3]\n" + np.arange(6, dtype="<f4").tobytes()).hexdigest()
    assert tensors_sha256({"w": t}) == want


def test_commands_refuse_a_corrupt_model_in_one_line(model_dir, tiny_tokenizer, capsys, tmp_path):
    """The probe's `quark serve` answered from flipped weights; now eval, chat and serve stop before any output."""
    pytest.importorskip("uvicorn")
    from quark.cli import main
    from tests.test_train import write_pretrain_data

    folder, _ = model_dir
    tiny_tokenizer.save(folder)
    data = write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=6)
    f = folder / "model.safetensors"
    flip_mantissa_bytes(f, "model.embed_tokens.weight")
    for argv in (["eval", "--model", str(folder), "--tasks", "", "--perplexity", str(data)],
                 ["chat", "--model", str(folder)],
                 ["serve", "--model", str(folder), "--engine", "thread", "--port", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"quark {argv[0]}: error: {f}: content hash mismatch") and err.count("\n") == 1, err
