"""Integrity of data and evaluation: shards checked against the manifest and the model's vocabulary before any
training step (OOV ids, a zeroed header, a truncated or replaced shard, a wrong dtype), each error naming the shard;
`quark prepare` records each shard's size and largest id; a NaN loss fails `quark eval` instead of being written;
invalid UTF-8 in an input file names the file and line, and `--skip-bad` skips and counts it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quark.cli import main
from quark.config import PRESETS
from quark.data import prepare as prep
from quark.data.mixture import load_mixture, mixture_from_dict
from quark.model import Quark
from quark.weights import save_model
from tests.test_train import train_cfg, write_pretrain_data

PRETRAIN = ["--set", "model=test", "--set", "max_steps=2", "--set", "batch_size=4", "--set", "eval_every=0",
            "--set", "samples=0", "--set", "plot=false", "--set", "tensorboard=false"]


def run(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.err.strip()


@pytest.fixture
def data(tmp_path, tiny_tokenizer):
    return write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=10)


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    d = save_model(Quark(PRESETS["test"]).init_weights(0), tmp_path / "model")
    tiny_tokenizer.save(d)
    return d


def zero_header(path, keep_paren: bool):
    """Zero the .npy header dict (after the magic and length): from its start, or from inside `'shape': (`, which
    leaves an unclosed parenthesis that numpy's tokenizer-based parser fails on with tokenize.TokenError."""
    raw = bytearray(path.read_bytes())
    start = raw.index(b"(") + 1 if keep_paren else 10
    raw[start:128] = bytes(128 - start)
    path.write_bytes(bytes(raw))


def test_oov_ids_fail_pretrain_and_eval_naming_the_shard(tmp_path, data, model_dir, capsys):
    for split, shard in (("train", "shard_00001.npy"), ("val", "shard_00000.npy")):
        f = data / split / shard
        ids = np.load(f)
        ids[::50] = 65535
        np.save(f, ids)
    out = tmp_path / "run"
    rc, err = run(capsys, "pretrain", "--data", str(data), "--out", str(out), *PRETRAIN)
    assert rc == 2 and err == (f"quark pretrain: error: {data / 'train' / 'shard_00001.npy'}: token id 65535 >= the "
                               "model's vocab_size 514; the data was tokenized with another tokenizer, or the shard "
                               "is damaged")
    assert not out.exists()  # nothing ran, nothing written
    rc, err = run(capsys, "eval", "--model", str(model_dir), "--tasks", "", "--perplexity", str(data))
    assert rc == 2 and err.startswith(f"quark eval: error: {data / 'val' / 'shard_00000.npy'}: token id 65535 >= ")
    assert not (model_dir / "eval_results.json").exists()


@pytest.mark.parametrize("damage,why", [
    ("zero", "not a readable .npy shard (damaged header? ValueError: Cannot parse header"),
    ("zero-shape", "not a readable .npy shard (damaged header? TokenError: ('EOF in multi-line statement'"),
    ("truncate", "not a readable .npy shard (truncated? ValueError: mmap length is greater than file size)"),
])
def test_unreadable_shards_fail_pretrain_and_eval_naming_the_shard(tmp_path, data, model_dir, capsys, damage, why):
    for f in (data / "train" / "shard_00000.npy", data / "val" / "shard_00000.npy"):
        if damage.startswith("zero"):
            zero_header(f, keep_paren=damage == "zero-shape")
        else:
            f.write_bytes(f.read_bytes()[:-100])
    rc, err = run(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "run"), *PRETRAIN)
    assert rc == 2 and err.startswith(f"quark pretrain: error: {data / 'train' / 'shard_00000.npy'}: {why}"), err
    rc, err = run(capsys, "eval", "--model", str(model_dir), "--tasks", "", "--perplexity", str(data))
    assert rc == 2 and err.startswith(f"quark eval: error: {data / 'val' / 'shard_00000.npy'}: {why}"), err


def test_dtype_and_length_must_match_the_manifest(tmp_path, data):
    from quark.train.loop import train

    f = data / "train" / "shard_00000.npy"
    ids = np.load(f)
    np.save(f, ids.astype(np.int32))
    with pytest.raises(ValueError, match=rf"^{f}: dtype int32, but {data / 'manifest.json'} says uint16$"):
        train(train_cfg(data, tmp_path / "run"))
    np.save(f, ids[:-7])  # a valid file, 7 tokens short: replaced or cut at a token boundary
    total = json.loads((data / "manifest.json").read_text())["splits"]["train"]["tokens"]
    with pytest.raises(ValueError, match=rf"^{data / 'train'}: shards hold {total - 7:,} tokens, but "
                                         rf"\S+manifest.json lists {total:,} \(a shard truncated or replaced\?\)"):
        train(train_cfg(data, tmp_path / "run"))


def test_prepare_records_sizes_and_max_ids_and_training_checks_them(tmp_path, tiny_tokenizer):
    from quark.train.loop import train

    srcs = []
    for i, names in enumerate((("abc.py", "bisect.py"), ("ast.py", "glob.py"))):  # a shard holds one source
        (tmp_path / f"src{i}").mkdir()
        for name in names:
            (tmp_path / f"src{i}" / name).write_text(_stdlib(name))
        srcs.append({"name": f"s{i}", "type": "files", "paths": [str(tmp_path / f"src{i}")], "license": "PSF-2.0"})
    mix = mixture_from_dict({"kind": "pretrain", "sources": srcs}, "test")
    out = tmp_path / "d"
    m = prep.prepare(mix, tiny_tokenizer, out, tokens=6000, shard_tokens=2048, progress=False, dedup=False)
    tiny_tokenizer.save(out)
    for split, info in m["splits"].items():
        arrays = [np.load(out / split / n) for n in info["shards"]]
        assert info["max_ids"] == [int(a.max()) for a in arrays] and info["shard_tokens"] == [len(a) for a in arrays]
    assert len(m["splits"]["train"]["shards"]) >= 2
    train(train_cfg(out, tmp_path / "ok", max_steps=1, seq_len=64))
    manifest = json.loads((out / "manifest.json").read_text())
    # the recorded max id is what the check reads: no shard data is scanned
    manifest["splits"]["train"]["max_ids"][1] = 999
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"^{out / 'train' / 'shard_00001.npy'}: token id 999 >= the model's "):
        train(train_cfg(out, tmp_path / "r1", max_steps=1, seq_len=64))
    # a shard edited after prepare (its recorded max id now wrong) fails at its first batch, naming it, also
    # where the manifest records no hashes (an older preparation: a recorded hash would fail it at once)
    manifest["splits"]["train"]["max_ids"][1] = int(np.load(out / "train" / "shard_00001.npy").max())
    for info in manifest["splits"].values():
        del info["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for n in manifest["splits"]["train"]["shards"]:
        ids = np.load(out / "train" / n)
        ids[::3] = 700
        np.save(out / "train" / n, ids)
    with pytest.raises(ValueError, match=r"train/shard_0000\d\.npy: token id 700 >= the model's vocab_size 514 "
                                         r"\(the shard changed after `quark prepare` recorded its largest id\?\)"):
        train(train_cfg(out, tmp_path / "r2", max_steps=1, seq_len=64))


def _stdlib(name: str) -> str:
    import sysconfig
    from pathlib import Path

    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")


def test_nan_loss_fails_eval_and_writes_nothing(tmp_path, data, capsys, monkeypatch, tiny_tokenizer):
    """Finite weights whose forward overflows (final norm 3e38): refused at load (one test forward pass); where
    the overflow shows only on the data (the load-time check passed), NaN loss and log-likelihoods are errors."""
    import quark.weights

    m = Quark(PRESETS["test"]).init_weights(0)
    with torch.no_grad():
        m.model.norm.weight.fill_(3e38)
    d = save_model(m, tmp_path / "overflow")
    tiny_tokenizer.save(d)
    rc, err = run(capsys, "eval", "--model", str(d), "--tasks", "", "--perplexity", str(data))
    assert rc == 2 and err == (f"quark eval: error: {d}: the weights overflow in the output head (activations reach "
                               "Inf/NaN on a test input, in this dtype): these weights are broken; use an earlier "
                               "checkpoint")
    monkeypatch.setattr(quark.weights, "check_activations", lambda *a: None)
    rc, err = run(capsys, "eval", "--model", str(d), "--tasks", "", "--perplexity", str(data))
    assert rc == 2 and err == (f"quark eval: error: {data}: the validation loss over the val split is nan (NaN/Inf): "
                               "the model's weights overflow on this data; nothing was written. Evaluate an earlier "
                               "checkpoint")
    from quark.eval import harness, tasks

    item = tasks.Item(contexts=("The capital of Italy is",), continuations=(" Rome", " Paris"), gold=0,
                      norm_chars=(4, 5))
    monkeypatch.setattr(tasks, "build_items", lambda *a, **k: [item] * 3)  # no task data needed offline
    monkeypatch.setattr(harness, "build_items", lambda *a, **k: [item] * 3)
    rc, err = run(capsys, "eval", "--model", str(d), "--tasks", "piqa", "--no-progress")
    assert rc == 2 and err == ("quark eval: error: task piqa: the log-likelihood is nan (NaN/Inf) for 6 of 6 "
                               "requests: the model's weights overflow; nothing was written")
    assert not list(d.glob("eval_results*"))


BAD_LINE = b'{"messages": [{"role": "user", "content": "Caf\xe9?"}, {"role": "assistant", "content": "Oui"}]}\n'


def test_invalid_utf8_in_sft_jsonl_names_file_and_line_and_skip_bad_counts_it(tmp_path, tiny_tokenizer, capsys):
    good = json.dumps({"messages": [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Ciao!"}]})
    f = tmp_path / "chat.jsonl"
    f.write_bytes((good + "\n").encode() + BAD_LINE + ((good + "\n") * 5).encode())
    tiny_tokenizer.save(tmp_path / "tok")
    base = ["prepare", "--sft", str(f), "--tokenizer", str(tmp_path / "tok"), "--seq-len", "64", "--quiet",
            "--no-dedup"]
    rc, err = run(capsys, *base, "--out", str(tmp_path / "o1"))
    col = BAD_LINE.index(b"\xe9") + 1
    assert rc == 2 and err == (f"quark prepare: error: {f}:2: not valid UTF-8 (byte 0xe9 at column {col}: invalid "
                               "continuation byte) (use --skip-bad to skip and count such records)")
    assert not (tmp_path / "o1" / "manifest.json").exists()
    rc = main([*base, "--out", str(tmp_path / "o2"), "--skip-bad"])
    assert rc == 0 and "bad skipped 1" in capsys.readouterr().out
    src = json.loads((tmp_path / "o2" / "manifest.json").read_text())["sources"][0]
    assert src["bad_skipped"] == 1 and src["documents"] == 6


def test_invalid_utf8_in_text_files_and_configs_names_file_and_line(tmp_path, tiny_tokenizer):
    from quark.data.sources import BadRecord, file_documents
    from quark.train.config import load_config

    t = tmp_path / "notes.txt"
    t.write_bytes(b"first line\nsecond \xff line\n")
    docs = list(file_documents([str(t)]))
    assert isinstance(docs[0], BadRecord)
    assert str(docs[0]) == f"{t}:2: not valid UTF-8 (byte 0xff at column 8: invalid start byte)"
    toml = tmp_path / "mix.toml"
    toml.write_bytes(b'kind = "pretrain"\n# caf\xe9\n')
    with pytest.raises(ValueError, match=rf"^{toml}:2: not valid UTF-8 \(byte 0xe9 at column 6"):
        load_mixture(toml)
    with pytest.raises(ValueError, match=rf"^{toml}:2: not valid UTF-8"):
        load_config(toml)


def test_sft_shards_are_checked_too(tmp_path, tiny_tokenizer):
    from quark.data.loader import SFTLoader
    from tests.test_train import write_sft_data

    convs = [[{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
             for i in range(12)]
    data = write_sft_data(tmp_path / "sft", tiny_tokenizer, convs, seq_len=32)
    assert len(SFTLoader(data, "train", 2, vocab_size=tiny_tokenizer.vocab_size)) == 8
    f = data / "train" / "sft_00000.ids.npy"
    ids = np.load(f)
    ids[3, 5] = 9999
    np.save(f, ids)
    with pytest.raises(ValueError, match=rf"^{f}: token id 9999 >= the model's vocab_size 514;"):
        SFTLoader(data, "train", 2, vocab_size=tiny_tokenizer.vocab_size)
    np.save(f, ids[:, :20])
    np.save(data / "train" / "sft_00000.mask.npy", np.load(data / "train" / "sft_00000.mask.npy")[:, :20])
    with pytest.raises(ValueError, match=rf"^{f}: rows of 20 ids, but \S+manifest.json says seq_len=32 \(rows of 33\)"):
        SFTLoader(data, "train", 2)
