"""The state of one `quark prepare` run, saved to `.prepare_state.json` in the output folder after every shard so
a rerun with the same inputs resumes where it stopped (`quark.data.prepare`).

Choices:
- Per-source progress is a `SourceProgress` dataclass, saved as a flat JSON object whose keys are its fields in
  order; an SFT split's totals are a `SplitRows`, saved as `<split>_rows`, `<split>_real_tokens`,
  `<split>_target_tokens` beside them. Shard records stay plain dicts: they are copied into the manifest.
- A state file written for other inputs (its `fingerprint` differs) is refused, never mixed with this run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_bytes

STATE = ".prepare_state.json"
SPLITS = ("train", "val")


@dataclass
class SourceProgress:
    """One source's cursor and counts. Saved as a flat JSON object (field order = key order on disk)."""

    done: bool = False
    epoch: int = 0          # the epoch being read (pre-training)
    docs: int = 0           # documents of that epoch read so far
    train_tokens: int = 0
    val_tokens: int = 0
    documents: int = 0      # documents kept (all epochs)
    bytes: int = 0
    train_bytes: int = 0
    val_bytes: int = 0
    empty_skipped: int = 0
    bad_skipped: int = 0
    eval_removed: int = 0
    epochs: int = 1
    truncated: int = 0
    too_long: int = 0
    val_docs: int = 0       # documents of the first epoch up to the last one sent to val

    def tokens(self, split: str) -> int:
        return self.train_tokens if split == "train" else self.val_tokens

    def split_bytes(self, split: str) -> int:
        return self.train_bytes if split == "train" else self.val_bytes

    def add(self, split: str, tokens: int, nbytes: int) -> None:
        """Count `tokens` and `nbytes` written to `split`."""
        if split == "train":
            self.train_tokens, self.train_bytes = self.train_tokens + tokens, self.train_bytes + nbytes
        else:
            self.val_tokens, self.val_bytes = self.val_tokens + tokens, self.val_bytes + nbytes


@dataclass
class SplitRows:
    """An SFT split's totals: rows, non-padding tokens, tokens with loss."""

    rows: int = 0
    real_tokens: int = 0
    target_tokens: int = 0


class PrepareState:
    """The resumable progress of one preparation, saved after every shard."""

    def __init__(self, out: Path, fingerprint: dict):
        self.path = out / STATE
        self.fingerprint = fingerprint
        self.shards: dict[str, list[dict]] = {"train": [], "val": []}
        self.sources: dict[str, SourceProgress] = {}
        self.sft_rows: dict[str, SplitRows] = {}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("fingerprint") != fingerprint:
                raise FileExistsError(f"{out} holds a different preparation (other mixture, tokenizer or options); "
                                      "use a new --out folder or delete it")
            self._load(old)

    def _load(self, old: dict) -> None:
        known = {f.name for f in dataclasses.fields(SourceProgress)}
        self.shards = old["shards"]
        self.sources = {name: SourceProgress(**{k: v for k, v in d.items() if k in known})
                        for name, d in old["sources"].items()}
        for split in SPLITS:
            if f"{split}_rows" in old:
                self.sft_rows[split] = SplitRows(*(old[f"{split}_{f.name}"] for f in dataclasses.fields(SplitRows)))

    def source(self, name: str) -> SourceProgress:
        return self.sources.setdefault(name, SourceProgress())

    def save(self) -> None:
        data = {"fingerprint": self.fingerprint, "shards": self.shards,
                "sources": {name: dataclasses.asdict(st) for name, st in self.sources.items()}}
        for split, rows in self.sft_rows.items():
            data.update({f"{split}_{k}": v for k, v in dataclasses.asdict(rows).items()})
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode())
