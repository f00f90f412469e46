"""Probe cases of issue 36 ("Trust, round two"), findings 4 (SFT data) and 6 (training state): each test repeats
one probe and checks the fix: one line naming the file, line or field and what to do, exit 2, nothing written lost;
`--skip-bad` skips and counts what it should; memory for one JSONL record is bounded before it is parsed."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from quark.cli import main
from tests.test_train import train_cfg, write_pretrain_data

GOOD = json.dumps({"messages": [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Ciao!"}]})


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.err.strip(), cap.out


def prepare_sft(tmp_path, capsys, bad_line: bytes):
    """`quark prepare --sft` on good lines around `bad_line` (line 2): (rc, stderr) without --skip-bad, then the
    manifest's source record of a --skip-bad run (which must succeed)."""
    f = tmp_path / "chat.jsonl"
    with open(f, "wb") as fh:
        fh.write((GOOD + "\n").encode())
        fh.write(bad_line)
        fh.write(b"\n")
        fh.write(((GOOD + "\n") * 5).encode())
    base = ["prepare", "--sft", f, "--tokenizer", tmp_path / "tok", "--seq-len", "64", "--quiet", "--no-dedup"]
    rc, err, _ = run(capsys, *base, "--out", tmp_path / "o1")
    assert not (tmp_path / "o1" / "manifest.json").exists()
    rc2, err2, out2 = run(capsys, *base, "--out", tmp_path / "o2", "--skip-bad")
    assert rc2 == 0, err2
    assert "bad skipped 1" in out2
    src = json.loads((tmp_path / "o2" / "manifest.json").read_text())["sources"][0]
    assert (src["bad_skipped"], src["documents"]) == (1, 6)
    return f, rc, err


@pytest.fixture
def sft_dir(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok")
    return tmp_path


# ---- finding 4: SFT data ------------------------------------------------------------------------------------------
def test_probe_sft_lone_surrogate(sft_dir, capsys):
    """4: a JSON \\ud800 escape in a message crashed `quark prepare --sft` with a traceback, also under --skip-bad."""
    bad = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab\\ud800c"}]}'
    f, rc, err = prepare_sft(sft_dir, capsys, bad)
    assert rc == 2
    assert err == (f"quark prepare: error: {f}:2: messages[1].content holds an unpaired surrogate (\\ud800 at "
                   "character 3); fix the text (each \\ud800-\\udbff escape must be followed by one of \\udc00-\\udfff) "
                   "(use --skip-bad to skip and count such records)")


def test_probe_sft_deep_nesting(sft_dir, capsys):
    """4: a deeply nested line's error named no file:line, and --skip-bad did not skip it."""
    bad = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    f, rc, err = prepare_sft(sft_dir, capsys, bad)
    assert rc == 2
    assert err == (f"quark prepare: error: {f}:2: JSON nested too deeply to read (arrays or objects inside each "
                   "other beyond Python's recursion limit); flatten the record (use --skip-bad to skip and count "
                   "such records)")


def test_probe_sft_60mb_line(sft_dir, capsys):
    """4: one 60 MB line took 9.16 GB of RAM before being dropped as too long: now it is refused by its length
    while reading, never parsed nor held whole (Python's peak allocation stays under 3x the 2 MiB limit)."""
    from quark.data.sources import MAX_CHAT_RECORD_BYTES as LIMIT

    bad = GOOD[:-1].encode() + b', "meta": "' + b"x" * (60 << 20) + b'"}'  # a valid record, 60 MB long
    n = len(bad) + 1
    tracemalloc.start()  # Python's allocations from here on (the line above is not counted)
    try:
        f, rc, err = prepare_sft(sft_dir, capsys, bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 2
    assert err == (f"quark prepare: error: {f}:2: a line of {n:,} bytes, over the limit of {LIMIT:,} bytes "
                   "for one conversation (not read); split or shorten it (use --skip-bad to skip and count such "
                   "records)")
    assert peak < 3 * LIMIT, f"peak {peak / 2**20:.0f} MiB"  # readline's pieces and their join: ~2x


# ---- finding 6: training state ------------------------------------------------------------------------------------
@pytest.fixture
def pretrain_data(tmp_path, tiny_tokenizer):
    return write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=10)


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_probe_train_state_edited(tmp_path, pretrain_data, capsys):
    """6: train_state.json was not covered by the hash: its step edited from 4 to 3 resumed at the wrong step with
    rc 0. Now the edit fails verification naming the file, the checkpoint is set aside (kept), and the run falls
    back to the older checkpoint, saying so, and repeats the first run's losses."""
    from quark.train.loop import train

    run = tmp_path / "run"
    cfg = train_cfg(pretrain_data, run, max_steps=4, save_every=2, keep_last=3)
    train(cfg)
    before = losses(run)
    edited = run / "checkpoints" / "step_000004" / "train_state.json"
    edited.write_text(edited.read_text().replace('"step": 4,', '"step": 3,'))
    capsys.readouterr()
    train(cfg)
    out, err = capsys.readouterr()
    corrupt = run / "checkpoints" / "corrupt-step_000004"
    assert f"warning: skipping checkpoint {edited.parent}: {edited}: content hash mismatch (sha256 " in err
    assert f"the file was edited or is corrupt; restore it or use an earlier checkpoint; moved it to {corrupt}; " \
           "trying the next older checkpoint" in err
    assert f"resuming from {run / 'checkpoints' / 'step_000002'} (step 2," in out
    assert (corrupt / "train_state.json").read_text().count('"step": 3,') == 1  # nothing lost
    assert losses(run) == before


def test_probe_tokens_per_step_not_a_multiple(tmp_path, pretrain_data, capsys):
    """6: `--set tokens_per_step=1000` silently ran 2,048 tokens per step. Now one line says what runs instead (the
    packaged SFT config relies on running at least one micro-batch: 131,072 < one micro-batch on 8 GPUs)."""
    from quark.train.loop import train

    run = tmp_path / "run"
    info = train(train_cfg(pretrain_data, run, max_steps=1, batch_size=16, seq_len=128, tokens_per_step=1000))
    out, err = capsys.readouterr()
    assert err.count("tokens_per_step") == 1
    assert ("warning: train config: tokens_per_step=1,000 is not a whole number of micro-batches of 2,048 tokens "
            "(batch_size=16 x seq_len=128 x 1 process(es)); running 2,048 tokens per step instead; nearest exact "
            "values: 2,048 (set one, or change batch_size)") in err
    assert info["tokens"] == 2048
    capsys.readouterr()
    train(train_cfg(pretrain_data, tmp_path / "run2", max_steps=1, batch_size=16, seq_len=128, tokens_per_step=4096))
    assert "tokens_per_step" not in capsys.readouterr().err  # a whole number of micro-batches: no warning


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_probe_shard_rewritten_with_valid_ids(tmp_path, tiny_tokenizer, capsys, kind):
    """6: a shard rewritten with valid ids trained silently (the manifest recorded no content hash). Now `quark
    prepare` records each shard's SHA-256 and training stops at once, naming the shard and the manifest field."""
    from quark.data import prepare as prep
    from quark.data.mixture import mixture_from_dict

    src = tmp_path / "src"
    src.mkdir()
    if kind == "pretrain":
        (src / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    else:
        (src / "a.jsonl").write_text("\n".join(json.dumps({"messages": [
            {"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]})
            for i in range(60)) + "\n")
    mix = mixture_from_dict({"kind": kind, "sources": [{"name": "s", "type": "files", "paths": [str(src)],
                                                        "license": "CC0", "chat": kind == "sft"}]}, "test")
    data = tmp_path / "data"
    m = prep.prepare(mix, tiny_tokenizer, data, tokens=3000 if kind == "pretrain" else None, seq_len=64,
                     progress=False, dedup=False)
    tiny_tokenizer.save(data)
    if kind == "sft":
        from quark.config import PRESETS
        from quark.model import Quark
        from quark.weights import save_model

        tiny_tokenizer.save(save_model(Quark(PRESETS["test"]).init_weights(0), tmp_path / "base"))
    train_split = m["splits"]["train"]
    assert len(train_split["sha256"]) == len(train_split["shards"])
    f = data / "train" / train_split["shards"][0]
    ids = np.load(f)
    np.save(f, ids[::-1].copy() if kind == "pretrain" else np.roll(ids, 1, axis=0))  # same ids, same size
    rc, err, _ = run(capsys, "sft" if kind == "sft" else "pretrain", "--data", data, "--out", tmp_path / "run",
                     *(["--from", tmp_path / "base"] if kind == "sft" else []), "--set", "model=test",
                     "--set", "max_steps=1", "--set", "batch_size=2", "--set", "seq_len=64", "--set", "samples=0",
                     "--set", "plot=false", "--set", "tensorboard=false")
    assert rc == 2
    assert err.startswith(f"quark {kind}: error: {f}: sha256 ")
    assert err.endswith(f"differs from {data / 'manifest.json'} sha256[0] ({train_split['sha256'][0][:12]}...): the "
                        "file changed after `quark prepare` wrote it; restore it or prepare the data again")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_probe_old_manifest_without_hashes_warns_once(tmp_path, pretrain_data, capsys):
    """6 (compatibility): data prepared before shard hashes were recorded still trains, with one warning line."""
    from quark.train.loop import train

    manifest = json.loads((pretrain_data / "manifest.json").read_text())
    for info in manifest["splits"].values():
        del info["sha256"]
    (pretrain_data / "manifest.json").write_text(json.dumps(manifest))
    train(train_cfg(pretrain_data, tmp_path / "run", max_steps=1))
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert (f"warning: {pretrain_data / 'manifest.json'} records no shard hashes (prepared by an older quark), so "
            "changed shards are not detected; prepare the data again to add them") in err
