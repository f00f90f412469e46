"""Disk failures are one line: a read-only folder, a full disk (OSError, and safetensors' SafetensorError) and a
missing permission end every writing command with `quark <cmd>: error: <path>: <what>; <what to do>`, exit 2, no
traceback, and what was written before is intact.

Tests run as root, where chmod stops nothing, so the failures are simulated at the system-call boundary (`os.open`,
`os.mkdir`, `open`, `os.fsync`, the safetensors and gguf writers raise the OSError the kernel would). Where this
process may mount a tmpfs (root on Linux), a tiny real file system is filled up and remounted read-only too."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError

from quark.cli import main
from quark.config import PRESETS
from quark.model import Quark
from quark.weights import save_model
from tests.test_train import write_pretrain_data

ROFS = "Read-only file system; choose an output folder on a writable file system, then rerun"
FULL = "No space left on device; free some space or write to another disk, then rerun"
DENIED = "Permission denied; choose a folder you may write to, or fix its permissions, then rerun"
PRETRAIN = ["--set", "model=test", "--set", "batch_size=4", "--set", "eval_every=0", "--set", "samples=0",
            "--set", "plot=false", "--set", "tensorboard=false", "--set", "log_every=1"]
CHAT = {"messages": [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Ciao! Come stai?"}]}


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and len(cap.err.strip().splitlines()) <= 1, cap.err
    return rc, cap.err.strip()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def deny_writes_under(monkeypatch, root: Path, code: int = errno.EROFS):
    """Every create/write under `root` fails with `code`, as a read-only mount (or, for EACCES, a folder without
    write permission for a non-root user) does; reads still work."""
    root = str(root)
    real_open, real_mkdir, real_bopen = os.open, os.mkdir, builtins.open

    def under(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(root)

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def os_open(path, flags, *a, **k):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_open(path, flags, *a, **k)

    def mkdir(path, *a, **k):
        if under(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
            fail(path)
        return real_mkdir(path, *a, **k)

    def bopen(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and under(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real_bopen(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", bopen)
    monkeypatch.setattr(io, "open", bopen)


@pytest.fixture
def setup(tmp_path, tiny_tokenizer):
    """A data folder, a tokenizer, an SFT file, a model folder and an earlier export, all outside the bad folder."""
    s = {"data": write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=8), "tok": tmp_path / "tok",
         "chat": tmp_path / "chat.jsonl", "model": tmp_path / "model"}
    tiny_tokenizer.save(s["tok"])
    s["chat"].write_text((json.dumps(CHAT) + "\n") * 8)
    s["text"] = tmp_path / "corpus" / "notes.txt"
    s["text"].parent.mkdir()
    s["text"].write_text("Ciao, come stai? Hello world, 12 + 7 = 19.\n" * 200)
    save_model(Quark(PRESETS["test"]).init_weights(0), s["model"])
    tiny_tokenizer.save(s["model"])
    return s


def commands(s, out: Path) -> dict[str, list]:
    """Each writing command, aimed at `out`."""
    return {
        "prepare": ["prepare", "--sft", s["chat"], "--tokenizer", s["tok"], "--out", out / "sft", "--seq-len", "64",
                    "--quiet", "--no-dedup"],
        "pretrain": ["pretrain", "--data", s["data"], "--out", out / "run", "--set", "max_steps=2", *PRETRAIN],
        "export": ["export", "--checkpoint", s["model"], "--out", out / "hf", "--force"],
        "export-gguf": ["export", "--checkpoint", s["model"], "--out", out / "m.gguf", "--format", "gguf", "--force"],
        "eval": ["eval", "--model", s["model"], "--tasks", "", "--perplexity", s["data"], "--perplexity-windows", "2",
                 "--output", out / "res.json"],
        "tokenizer": ["tokenizer", "train", "--corpus", s["text"], "--vocab-size", "280", "--max-bytes", "20000",
                      "--out", out / "tok", "--quiet"],
    }


def fill_folder(s, out: Path, capsys) -> dict:
    """Run every command once into `out` so there are earlier outputs to keep; returns their bytes."""
    for name, argv in commands(s, out).items():
        rc, err = run(capsys, *argv)
        assert rc == 0, (name, err)
    return snapshot(out)


def where(name: str, out: Path) -> Path:
    """The path each command's error names: its output, the file inside it that failed, or (export, which
    assembles its folder beside the old one) the folder that holds it."""
    return {"prepare": out / "sft", "pretrain": out / "run", "export": out, "export-gguf": out / "m.gguf",
            "eval": out / "res.json", "tokenizer": out / "tok"}[name]


@pytest.mark.parametrize("code,what", [(errno.EROFS, ROFS), (errno.EACCES, DENIED)])
def test_unwritable_folder_fails_every_command_in_one_line(tmp_path, setup, capsys, monkeypatch, code, what):
    out = tmp_path / "out"
    before = fill_folder(setup, out, capsys)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    deny_writes_under(monkeypatch, tmp_path / "out")
    deny_writes_under(monkeypatch, fresh, code)
    for name, argv in commands(setup, fresh).items():  # into an empty folder: the first write fails
        rc, err = run(capsys, *argv)
        assert rc == 2 and err.startswith(f"quark {argv[0]}: error: {fresh}"), (name, err)
        assert err.endswith(f": {what}"), (name, err)
    assert list(fresh.iterdir()) == []
    monkeypatch.undo()
    deny_writes_under(monkeypatch, out, code)
    for name, argv in commands(setup, out).items():  # over earlier outputs: they stay as they were
        rc, err = run(capsys, *argv)
        if name == "pretrain":  # a finished run: resuming it first rewrites its metrics.jsonl, which fails
            assert rc == 2 and err == f"quark pretrain: error: {out / 'run' / 'metrics.jsonl'}: {what}", err
            continue
        assert rc == 2 and err.startswith(f"quark {argv[0]}: error: {where(name, out)}"), (name, err)
        assert err.endswith(f": {what}"), (name, err)
    monkeypatch.undo()
    assert snapshot(out) == before


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, setup, capsys, monkeypatch):
    from quark import weights

    run_dir = tmp_path / "run"
    argv = ["pretrain", "--data", setup["data"], "--out", run_dir, *PRETRAIN, "--set", "save_every=2"]
    assert run(capsys, *argv, "--set", "max_steps=2")[0] == 0
    good = run_dir / "checkpoints" / "step_000002"
    before = snapshot(good)
    real = weights.save_file

    def full(tensors, path, metadata=None):
        if "train_state" in str(path):  # the model file goes through, then the disk fills up
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(weights, "save_file", full)
    rc, err = run(capsys, *argv, "--set", "max_steps=4")
    tmp_dir = next(iter((run_dir / "checkpoints").glob(".tmp-*")), None)
    assert tmp_dir is None and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002"]
    assert rc == 2 and err.startswith(f"quark pretrain: error: saving the checkpoint of step 4 failed: "
                                      f"{run_dir / 'checkpoints'}/.tmp-step_000004-")
    assert err.endswith(f"/train_state.safetensors: {FULL}; the previous checkpoint {good} is intact; rerun the "
                        "same command to resume."), err
    assert snapshot(good) == before
    monkeypatch.undo()
    assert run(capsys, *argv, "--set", "max_steps=4")[0] == 0  # after "freeing space" the run resumes and ends


def test_full_disk_during_exports_and_prepare(tmp_path, setup, capsys, monkeypatch):
    from quark import weights

    out = tmp_path / "out"
    argv = commands(setup, out)
    for name in ("export", "export-gguf", "prepare"):
        assert run(capsys, *argv[name])[0] == 0
    before = snapshot(out)

    def full_safetensors(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(weights, "save_file", full_safetensors)
    rc, err = run(capsys, *argv["export"])
    assert (rc, err) == (2, f"quark export: error: {out / 'hf'}: {FULL}")
    import gguf

    def full_write(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")  # a write() on a full disk names no file

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_write)
    rc, err = run(capsys, *argv["export-gguf"])
    assert (rc, err) == (2, f"quark export: error: {out / 'm.gguf'}: {FULL}")

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_fsync)
    rc, err = run(capsys, *argv["prepare"])  # a rerun: the shards are there; the state and manifest writes fail
    assert rc == 2 and err.startswith(f"quark prepare: error: {out / 'sft'}/") and err.endswith(FULL), err
    monkeypatch.undo()
    assert snapshot(out) == before  # nothing earlier lost, no temporary file left behind


# ---- a real tiny file system, where this process may mount one --------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                           timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root: {r.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=10, check=False)


def test_real_full_and_read_only_file_system(tmpfs, setup, capsys):
    (tmpfs / "earlier.txt").write_text("kept")
    big = Quark(PRESETS["test"].replace(d_model=128, d_ff=512, n_heads=4, n_kv_heads=2)).init_weights(0)
    save_model(big, setup["model"])  # ~1.3 MB of weights: more than the file system holds
    rc, err = run(capsys, "export", "--checkpoint", setup["model"], "--out", tmpfs / "hf")
    assert (rc, err) == (2, f"quark export: error: {tmpfs / 'hf'}: {FULL}")
    assert snapshot(tmpfs) == {"earlier.txt": b"kept"}  # the staging folder is gone too
    rc, err = run(capsys, "eval", "--model", setup["model"], "--tasks", "", "--perplexity", setup["data"],
                  "--perplexity-windows", "1", "--output", tmpfs / "res.json")
    assert rc == 0 and (tmpfs / "res.json").exists()
    before = snapshot(tmpfs)
    r = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True, timeout=10, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
    for argv in (commands(setup, tmpfs)["prepare"], commands(setup, tmpfs)["eval"],
                 commands(setup, tmpfs)["pretrain"]):
        rc, err = run(capsys, *argv)
        assert rc == 2 and err.startswith(f"quark {argv[0]}: error: {tmpfs}/") and err.endswith(ROFS), err
    assert snapshot(tmpfs) == before
