"""Issue 36's probes of the kernel build (findings 1 and 9) and of CLI edges (finding 7), one test per case; each
failed on the code before its fix. The kernel cases run `quark.kernels._load` in a child process (a hang there
must not hang the suite) with the portable tier (which every CPU runs) and a compiler that cannot build (CXX=false),
so no case compiles anything and each takes a few seconds on any CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quark import kernels
from quark.cli import main

ROOT = Path(__file__).resolve().parent.parent
KERNELS = "from quark import kernels\n"


def _kernels_child(tmp_path, code, timeout=60, **env):
    """Run KERNELS + code in a child process with its extension folder under tmp_path; the old code hung here."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": "false",
           "QUARK_CPU_ISA": "portable", **env}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-c", KERNELS + code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _build_folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folder = kernels.build_directory("portable")
    folder.mkdir(parents=True)
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_probe_stale_lock_dead_owner(tmp_path, monkeypatch):
    """Finding 1: "a leftover build lock hangs --quantize int8 forever with no output" (a build killed by SIGTERM
    leaves torch's `lock`). Its owner is dead: the lock is removed with one note and the build goes on."""
    folder = _build_folder(tmp_path, monkeypatch)
    (folder / "lock").touch()  # what torch's FileBaton leaves behind
    (folder / "quark.lock").write_text(str(_dead_pid()))
    r = _kernels_child(tmp_path, "print(kernels.available())")
    assert not (folder / "lock").exists()
    assert r.stderr.count(f"quark: removed {folder / 'lock'}, left by a build") == 1, r.stderr
    assert r.returncode == 0 and r.stdout.strip() == "False"  # CXX=false: the build itself fails, warned


def test_probe_stale_lock_live_owner_wait_is_bounded(tmp_path, monkeypatch):
    """Finding 1: "FileBaton.wait() has no timeout". A live process holding the build (a hung build) is waited for
    at most BUILD_WAIT_S, then torch's kernels are used with one note naming its pid; its lock is left alone."""
    import fcntl

    folder = _build_folder(tmp_path, monkeypatch)
    (folder / "lock").touch()
    fd = os.open(folder / "quark.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # this test process is the builder
        os.write(fd, str(os.getpid()).encode())
        r = _kernels_child(tmp_path, "kernels.BUILD_WAIT_S = 1.0\nprint(kernels.available())")
    finally:
        os.close(fd)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("quark:")]
    assert notes == [f"quark: waited 1 s for the build of quark's CPU kernels by pid {os.getpid()} "
                     f"({folder / 'quark.lock'}); using torch's kernels in this process"], r.stderr
    assert (folder / "lock").exists()  # a live build's lock is not ours to remove


def test_probe_no_compiler_one_line(tmp_path):
    """Finding 9: "with no c++ on PATH ... torch's misleading 'Your compiler (c++) is not compatible' banner and a
    truncated ninja command line". Now one line says c++ is missing, and nothing is built."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    r = _kernels_child(tmp_path, "print(kernels.available())", PATH=str(empty_bin), CXX=None)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    assert r.stderr.strip() == ("quark: c++ not found on PATH (install g++, or set CXX to a C++ compiler, to build "
                                "quark's CPU kernels); using torch's kernels"), r.stderr


def test_probe_read_only_built_folder_is_loaded(tmp_path, monkeypatch):
    """Finding 9: "an already-built, read-only extension folder is not used". The built library is loaded as it is,
    with nothing written there and no compiler run (here a placeholder file, and load_library records the call:
    the real one would take a build)."""
    folder = _build_folder(tmp_path, monkeypatch)
    (folder / "quark_portable.so").write_bytes(b"placeholder")
    folder.chmod(0o555)
    try:
        r = _kernels_child(tmp_path, """
import os, torch
os.access = lambda path, mode: mode != os.W_OK  # read-only for root too (root may write a 0o555 folder)
loaded = []
torch.ops.load_library = loaded.append
print(kernels.available(), loaded)
""")
    finally:
        folder.chmod(0o755)
    assert r.stdout.strip() == f"True ['{folder / 'quark_portable.so'}']", r.stdout + r.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["quark_portable.so"]  # no lock, no build files


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"quark {command}: error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_probe_eval_limit_not_positive(tmp_path, capsys, limit):
    """Finding 7: "quark eval --limit 0 -> ZeroDivisionError traceback; --limit -1 silently drops the last item"
    (arith, whose items are built after the model loads). Now one line before anything loads, exit 2."""
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", "arith", "--limit", limit,
                 "--output", str(out)]) == 2
    assert _one_error_line(capsys, "eval") == f"quark eval: error: --limit must be a positive integer, got {limit}"
    assert not out.exists()


def test_probe_serve_port_in_use(tmp_path, capsys):
    """Finding 7: "quark serve on a port in use exits 3 with uvicorn's message". Now one line naming the port,
    exit 2, before the model loads (the model folder here does not even exist)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path / "missing"), "--port", str(port)]) == 2
    assert _one_error_line(capsys, "serve").startswith(f"quark serve: error: port {port} on 127.0.0.1 is in use")


def test_probe_poisoned_eval_texts_cache(tmp_path, monkeypatch, capsys):
    """Finding 7: "a poisoned ~/.cache/quark/eval_texts_*.npy makes every later quark prepare fail without naming
    the file". Now the file is named once and rebuilt (atomically), and the next run reads it silently."""
    from quark.data import dedup

    monkeypatch.setenv("QUARK_CACHE", str(tmp_path))
    text = "A question long enough to count as an evaluation item, and its answer."
    (tmp_path / "benchmarks").mkdir()
    monkeypatch.setattr(dedup, "package_dir", lambda name: tmp_path / "benchmarks")  # "installed", read instantly:
    monkeypatch.setattr(dedup, "eval_texts_from_folder", lambda *_: frozenset({text}))
    want = frozenset({dedup.text_hash(text)})
    dedup.eval_texts.cache_clear()
    try:
        assert dedup.eval_texts() == want
        [cache] = tmp_path.glob("eval_texts_*.npy")
        cache.write_bytes(b"\x93NUMPY poisoned")
        dedup.eval_texts.cache_clear()
        capsys.readouterr()
        assert dedup.eval_texts() == want
        err = capsys.readouterr().err
        assert err.startswith(f"quark: {cache}: a damaged cache of evaluation-text hashes (unreadable: ") \
            and err.endswith("); rebuilding it\n") and err.count("\n") == 1, err
        dedup.eval_texts.cache_clear()
        assert dedup.eval_texts() == want and capsys.readouterr().err == ""  # rebuilt: read back, no note
    finally:
        dedup.eval_texts.cache_clear()
