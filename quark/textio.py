"""Reading text input files as UTF-8 with errors that name the file, line and column of a bad byte.

Choices:
- Python's `UnicodeDecodeError` names neither the file nor the line; every reader of a user-supplied text file
  (mixtures, configs, manifests, JSON beside weights) goes through `read_utf8`, which raises a ValueError saying
  `<file>:<line>: not valid UTF-8 (byte 0xe9 at column 12: invalid continuation byte)`.
- Record-by-record readers (JSONL, text corpora in `quark.data.sources`) use `utf8_problem` for the same wording
  and let `--skip-bad` skip and count the record instead of stopping.
"""

from __future__ import annotations

from pathlib import Path


def utf8_problem(e: UnicodeDecodeError, data: bytes, line_start: int | None = None) -> str:
    """'not valid UTF-8 (byte 0xe9 at column 12: ...)' for a decoding error in `data` (column within its line)."""
    start = data.rfind(b"\n", 0, e.start) + 1 if line_start is None else line_start
    return f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {e.start - start + 1}: {e.reason})"


def utf8_line(data: bytes, pos: int) -> int:
    """1-based line number of byte offset `pos`."""
    return data.count(b"\n", 0, pos) + 1


def read_utf8(path: str | Path) -> str:
    """The text of a file, or a ValueError naming file:line when it is not valid UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{utf8_line(data, e.start)}: {utf8_problem(e, data)}") from None
