"""Atomic file writes, and write failures reported as one OSError naming the file.

Choices:
- Every file Quark writes (weights, configs, tokenizers, shards, manifests, reports) goes to a temp file in the same
  folder, is flushed to disk, and is renamed into place, so a crash or a full disk never leaves a half-written file
  behind and the file that was there before survives.
- A failed write (an OSError, or an error of a Rust writer such as safetensors' SafetensorError or tokenizers'
  Exception, which carry the OS error only as "(os error N)" in their text) is re-raised as an OSError naming the
  file being written, so `quark.cli` can print one line with the path.
- Standard library only: every module may import this one without pulling in torch or the model.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_error(e: BaseException, path: str | Path) -> OSError | None:
    """`e` as an OSError naming `path`; None when `e` is not an I/O failure (re-raised as is)."""
    if isinstance(e, OSError):
        return OSError(e.errno, e.strerror or str(e), str(path)) if e.errno else None
    m = re.search(r"os error (\d+)", str(e))
    return OSError(int(m[1]), os.strerror(int(m[1])), str(path)) if m else None


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` to fill a temp file beside `path`, then rename it to `path`; on failure the temp file is
    removed and an I/O error is re-raised naming `path`."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if (err := write_error(e, path)) is not None:
            raise err from None
        raise


def _write_synced(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: _write_synced(tmp, data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
