"""Run untrusted model-written Python (HumanEval completions) in a child process, never in ours.

What is enforced, per program:
- a separate `python -I` process (isolated mode: no PYTHONPATH, no user site-packages, cwd not on sys.path) in a
  fresh temporary working directory that is deleted afterwards, with a minimal environment (PATH, LANG and
  HOME=the temp dir; every proxy variable and credential in our environment is dropped);
- resource limits set (soft = hard) by a prelude the child runs before the program, with `resource.setrlimit`:
  address space (`memory_mb`), CPU seconds, file size written (16 MiB), open files (64), no core dumps (set in
  the child rather than by `preexec_fn`, which is unsafe while our worker threads run);
- a wall-clock limit (`timeout_s`): on expiry the child's whole process group is killed (it runs in its own session);
- no network: when `unshare --net` works on this machine (Linux, root or unprivileged user namespaces) the child
  runs in a new network namespace with no interfaces but loopback down, so no connection can leave it; in addition,
  always, a prelude replaces `socket.socket` (by a subclass whose constructor raises), `socket.create_connection`
  and `socket.socketpair`, which stops ordinary library code (urllib, http.client, requests) from connecting. The
  prelude alone is a speed bump, not a wall (a program can reach `_socket`); `sandbox_info()["network"]` says which
  applied, and the eval result records it.
Result per program: "passed", "failed: <last line of stderr>", or "timed out".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

PRELUDE = """\
import resource as _r, socket as _s
for _k, _v in (("AS", {mem}), ("CPU", {cpu}), ("FSIZE", {fsize}), ("NOFILE", 64), ("CORE", 0)):
    _r.setrlimit(getattr(_r, "RLIMIT_" + _k), (_v, _v))
def _no_network(*a, **k):
    raise OSError("network access is disabled in the quark eval sandbox")
class _NoSocket(_s.socket):  # a class, so modules that subclass socket.socket (ssl) still import
    __init__ = _no_network
_s.socket, _s.create_connection, _s.socketpair = _NoSocket, _no_network, _no_network
del _r, _s, _k, _v
"""
FILE_LIMIT = 16 << 20


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """('unshare', '--net', ...) when a new network namespace can be made here, else ()."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "--net"), (exe, "--user", "--map-root-user", "--net")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def sandbox_info() -> dict:
    """What the sandbox enforces on this machine (recorded beside the scores)."""
    net = "network namespace (unshare --net) + socket block" if _unshare_prefix() else "socket block only"
    return {"process": "python -I child, own session, temp cwd", "network": net,
            "limits": "RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE 16 MiB, RLIMIT_NOFILE 64, RLIMIT_CORE 0, wall clock"}


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> str:
    """Execute `source` in the sandbox: "passed" (exit 0), "failed: <reason>" or "timed out"."""
    work = tempfile.mkdtemp(prefix="quark-sandbox-")
    try:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(PRELUDE.format(mem=memory_mb << 20, cpu=int(timeout_s) + 1, fsize=FILE_LIMIT) + source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [*_unshare_prefix(), sys.executable, "-I", path]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return "timed out"
        if proc.returncode == 0:
            return "passed"
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return f"failed: {lines[-1][:200] if lines else f'exit status {proc.returncode}'}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def run_programs(sources: list[str], timeout_s: float = 10.0, memory_mb: int = 1024, workers: int = 2,
                 on_done: Callable[[int], object] | None = None) -> list[str]:
    """`run_program` over many sources, `workers` at a time, results in input order."""
    def one(src: str) -> str:
        r = run_program(src, timeout_s, memory_mb)
        if on_done is not None:
            on_done(1)
        return r

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, sources))
