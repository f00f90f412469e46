"""Training data loaders: context windows from pre-training shards, conversation rows from SFT shards.

Both read the data folder written by `quark prepare` (`manifest.json`, `train/`, `val/`; the layout is described
in `quark.data.prepare`).

Choices:
- Shards are opened with `np.load(..., mmap_mode="r")`: only the windows a batch uses are read from disk, so a
  corpus of any size costs no RAM.
- Pre-training: each split is one virtual token stream (shards in manifest order). It is cut into non-overlapping
  windows of `seq_len + 1` tokens at stride `seq_len` (the last target of one window is the first input of the
  next), never across a shard boundary. Each epoch visits every window once, in an order drawn from
  `(seed, epoch)`. SFT rows work the same way, one row per sample.
- Sample number `i` of the run is a pure function of `(seed, i)`, and the only state is the count of samples
  consumed. Resume restores that count, so it is exact; under DDP rank r of W takes rows `r*b .. r*b+b-1` of every
  global micro-batch of `W*b` rows, so any world size sees the same global batch as one process would.
- Validation reads the first windows/rows of the val split in file order, the same set at every evaluation.
- Shards are validated when a loader opens them, before any step: the `.npy` header must parse, the dtype and the
  length (tokens, or rows of `seq_len + 1`) must match the manifest, and with `vocab_size` given the largest token
  id must be below it. `quark prepare` records each shard's largest id (`max_ids`), so the check reads no data;
  for older manifests it is computed once per shard when the loader opens it (a memory-mapped max, ~10 ms per
  16M tokens). Batches re-check their ids, so a shard edited after preparation fails naming the shard, not with
  an IndexError deep inside torch.
- Content: `quark prepare` records each shard file's SHA-256 (`sha256`, and `mask_sha256` for SFT masks); a loader
  hashes every shard of its split when it opens them and refuses one that differs, naming it (a shard rewritten
  with valid ids would otherwise train silently). Hashing reads each file once: ~50 ms per 32 MB shard (16M
  tokens) on the dev machine's CPU, i.e. ~15 s per 10 GB of shards (5B tokens) at each start. Manifests without
  hashes (older preparations) load unchecked; `unhashed_warning` is the one line the trainer prints for them.
- SFT batches are trimmed to the longest row in the batch (rounded up to a bucket of seq_len/8) so padding
  costs no compute, while the number of distinct shapes stays small for `torch.compile`.
"""

from __future__ import annotations

import hashlib
import json
import tokenize
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..textio import read_utf8

MANIFEST = "manifest.json"
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # inputs, targets, loss mask (SFT only)


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a data folder, with a clear error when the folder or file is missing or broken."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: data folder not found (create it with `quark prepare`)")
    path = folder / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing manifest.json; is {folder} a data folder written by `quark prepare`?")
    try:
        m = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("kind", "splits"):
        if key not in m:
            raise ValueError(f"{path}: missing field {key!r}")
    if m["kind"] not in ("pretrain", "sft"):
        raise ValueError(f"{path}: field kind={m['kind']!r}; allowed: 'pretrain', 'sft'")
    return m


def _split_files(folder: Path, manifest: dict, split: str) -> list[Path]:
    info = manifest["splits"].get(split)
    if not info or not info.get("shards"):
        raise ValueError(f"{folder / MANIFEST}: split {split!r} lists no shards")
    files = [folder / split / name for name in info["shards"]]
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: shard listed in {folder / MANIFEST} is missing")
    return files


def _open(path: Path, ndim: int, dtypes: tuple) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as e:  # numpy parses the header as
        # Python literals: a damaged one raises any of these
        why = "truncated?" if "greater than file size" in str(e) else "damaged header?"
        raise ValueError(f"{path}: not a readable .npy shard ({why} {type(e).__name__}: {str(e)[:80]})") from None
    if arr.ndim != ndim or arr.dtype not in dtypes:
        raise ValueError(f"{path}: expected a {ndim}-D array of {'/'.join(str(np.dtype(d)) for d in dtypes)}, "
                         f"found shape {arr.shape} dtype {arr.dtype}")
    return arr


def _max_id(arr: np.ndarray, chunk: int = 1 << 24) -> int:
    return max((int(arr[i:i + chunk].max()) for i in range(0, len(arr), chunk)), default=-1)


def check_shards(folder: Path, manifest: dict, split: str, arrays: list[np.ndarray], vocab_size: int | None) -> None:
    """Dtype, length, SHA-256 and largest id of a split's shards against the manifest (see the module docstring)."""
    info, where = manifest["splits"][split], folder / MANIFEST
    names = info["shards"]
    want_dtype = manifest.get("dtype")
    sizes = info.get("shard_tokens") if manifest["kind"] == "pretrain" else info.get("shard_rows")
    unit = "tokens" if manifest["kind"] == "pretrain" else "rows"
    for k, (name, arr) in enumerate(zip(names, arrays)):
        path = folder / split / name
        if want_dtype and arr.dtype != np.dtype(want_dtype):
            raise ValueError(f"{path}: dtype {arr.dtype}, but {where} says {want_dtype}")
        if sizes is not None and len(arr) != sizes[k]:
            raise ValueError(f"{path}: {len(arr):,} {unit}, but {where} lists {sizes[k]:,} (truncated or replaced?)")
        if manifest["kind"] == "sft" and manifest.get("seq_len") and arr.shape[1] != manifest["seq_len"] + 1:
            raise ValueError(f"{path}: rows of {arr.shape[1]} ids, but {where} says seq_len={manifest['seq_len']} "
                             f"(rows of {manifest['seq_len'] + 1})")
    total = info.get("tokens") if manifest["kind"] == "pretrain" else info.get("rows")
    if sizes is None and total is not None and sum(len(a) for a in arrays) != total:
        raise ValueError(f"{folder / split}: shards hold {sum(len(a) for a in arrays):,} {unit}, but {where} "
                         f"lists {total:,} (a shard truncated or replaced?)")
    recorded = info.get("max_ids") or [None] * len(names)
    for name, arr, top in zip(names, arrays, recorded):
        if vocab_size is None:
            break
        top = _max_id(arr.reshape(-1)) if top is None else top
        if top >= vocab_size:
            raise ValueError(f"{folder / split / name}: token id {top} >= the model's vocab_size {vocab_size}; the "
                             "data was tokenized with another tokenizer, or the shard is damaged")
    check_hashes(folder, manifest, split)  # last: the checks above name the more specific problem


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_hashes(folder: Path, manifest: dict, split: str) -> None:
    """Each shard file (and SFT mask) of a split against the SHA-256 the manifest records, when it records one."""
    info = manifest["splits"][split]
    for key, names in (("sha256", "shards"), ("mask_sha256", "mask_shards")):
        for k, (name, want) in enumerate(zip(info.get(names) or [], info.get(key) or [])):
            path = folder / split / name
            if (got := file_sha256(path)) != want:
                raise ValueError(f"{path}: sha256 {got[:12]}... differs from {folder / MANIFEST} {key}[{k}] "
                                 f"({want[:12]}...): the file changed after `quark prepare` wrote it; restore it or "
                                 "prepare the data again")


def unhashed_warning(folder: str | Path, manifest: dict) -> str | None:
    """One warning line when the manifest records no shard hashes (a preparation by an older quark)."""
    if all(info.get("sha256") for info in manifest["splits"].values() if info.get("shards")):
        return None
    return (f"warning: {Path(folder) / MANIFEST} records no shard hashes (prepared by an older quark), so changed "
            "shards are not detected; prepare the data again to add them")


def _check_batch(ids: np.ndarray, vocab_size: int | None, shard_of: Callable[[int], Path]) -> None:
    if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
        r = int(np.argwhere(ids >= vocab_size)[0][0])
        raise ValueError(f"{shard_of(r)}: token id {int(ids.max())} >= the model's vocab_size {vocab_size} (the shard "
                         "changed after `quark prepare` recorded its largest id?)")


class _EpochOrder:
    """Sample index -> item index: a fresh permutation of `n` items for every epoch, drawn from (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, i: int) -> int:
        epoch = i // self.n
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[i % self.n])


class _Loader:
    """Shared state handling: `consumed` counts global samples; rank/world pick this process's rows."""

    kind = ""

    def __init__(self, seed: int, batch_size: int, rank: int, world_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.seed, self.batch_size, self.rank, self.world_size = seed, batch_size, rank, world_size
        self.consumed = 0
        self.order = _EpochOrder(len(self), seed)

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def epoch(self) -> float:
        return self.consumed / len(self)

    def _take_indices(self) -> list[int]:
        start = self.consumed + self.rank * self.batch_size
        self.consumed += self.batch_size * self.world_size
        return [self.order(start + j) for j in range(self.batch_size)]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "consumed": self.consumed, "items": len(self)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("kind", "seed", "items"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"loader state does not match the data: {key}={state.get(key)!r} in the checkpoint, "
                                 f"{mine!r} now (did the data folder or seed change?)")
        self.consumed = int(state["consumed"])


class PretrainLoader(_Loader):
    """Batches `(inputs, targets, None)` of shape (batch_size, seq_len) int64 from a pre-training split."""

    kind = "pretrain"

    def __init__(self, folder: str | Path, split: str, seq_len: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, manifest: dict | None = None, vocab_size: int | None = None):
        folder = Path(folder)
        manifest = manifest or read_manifest(folder)
        if manifest["kind"] != "pretrain":
            raise ValueError(f"{folder}: a {manifest['kind']!r} data folder; pre-training needs kind 'pretrain'")
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.files = _split_files(folder, manifest, split)
        self.shards = [_open(f, 1, (np.uint16, np.int32, np.uint32)) for f in self.files]
        check_shards(folder, manifest, split, self.shards, vocab_size)
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            raise ValueError(f"{folder / split}: fewer than seq_len + 1 = {seq_len + 1} tokens in every shard")
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # window index -> shard via searchsorted
        super().__init__(seed, batch_size, rank, world_size)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, w: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, w, side="right")) - 1
        off = (w - int(self.starts[s])) * self.seq_len
        return self.shards[s][off:off + self.seq_len + 1]

    def _batch(self, windows: list[int]):
        buf = np.stack([self.window(w) for w in windows]).astype(np.int64)
        _check_batch(buf, self.vocab_size,
                     lambda r: self.files[int(np.searchsorted(self.starts, windows[r], side="right")) - 1])
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous(), None

    def next_batch(self) -> Batch:
        return self._batch(self._take_indices())

    def val_batches(self, n_batches: int) -> Iterator[Batch]:
        """The first n_batches * world_size * batch_size windows in file order, this rank's share."""
        total = min(len(self), n_batches * self.world_size * self.batch_size)
        mine = list(range(total))[self.rank::self.world_size]
        for i in range(0, len(mine), self.batch_size):
            yield self._batch(mine[i:i + self.batch_size])


class SFTLoader(_Loader):
    """Batches `(inputs, targets, loss_mask)` from SFT rows: ids[:, :-1], ids[:, 1:], mask[:, 1:]."""

    kind = "sft"

    def __init__(self, folder: str | Path, split: str, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, manifest: dict | None = None, trim: bool = True, vocab_size: int | None = None):
        folder = Path(folder)
        manifest = manifest or read_manifest(folder)
        if manifest["kind"] != "sft":
            raise ValueError(f"{folder}: a {manifest['kind']!r} data folder; SFT needs kind 'sft'")
        self.ids, self.masks = [], []
        files = _split_files(folder, manifest, split)
        mask_names = manifest["splits"][split].get("mask_shards") or [f.name.replace(".ids.npy", ".mask.npy")
                                                                       for f in files]
        for f, mask_name in zip(files, mask_names, strict=True):
            mask_path = f.with_name(mask_name)
            if mask_path == f or not mask_path.exists():
                raise FileNotFoundError(f"{mask_path}: the loss mask for {f.name} is missing")
            ids, mask = _open(f, 2, (np.int32, np.int64)), _open(mask_path, 2, (np.uint8, np.bool_))
            if ids.shape != mask.shape:
                raise ValueError(f"{mask_path}: shape {mask.shape} differs from {f.name} {ids.shape}")
            self.ids.append(ids)
            self.masks.append(mask)
        check_shards(folder, manifest, split, self.ids, vocab_size)
        self.files, self.vocab_size = files, vocab_size
        widths = {a.shape[1] for a in self.ids}
        if len(widths) != 1:
            raise ValueError(f"{folder / split}: SFT shards disagree on row width {sorted(widths)}")
        self.seq_len = widths.pop() - 1
        self.trim, self.bucket = trim, max(1, self.seq_len // 8)
        self.starts = np.concatenate([[0], np.cumsum([len(a) for a in self.ids])])
        if self.starts[-1] == 0:
            raise ValueError(f"{folder / split}: no SFT rows")
        super().__init__(seed, batch_size, rank, world_size)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        s = int(np.searchsorted(self.starts, r, side="right")) - 1
        j = r - int(self.starts[s])
        return self.ids[s][j], self.masks[s][j]

    def _batch(self, rows: list[int]):
        pairs = [self.row(r) for r in rows]
        ids = np.stack([p[0] for p in pairs]).astype(np.int64)
        _check_batch(ids, self.vocab_size,
                     lambda i: self.files[int(np.searchsorted(self.starts, rows[i], side="right")) - 1])
        ids = torch.from_numpy(ids)
        mask = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.bool_))
        width = ids.shape[1]
        if self.trim:
            used = mask[:, 1:].any(0).nonzero()
            last = int(used[-1]) + 1 if len(used) else 1
            width = min(self.seq_len, -(-last // self.bucket) * self.bucket) + 1
        ids, mask = ids[:, :width], mask[:, :width]
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask[:, 1:].contiguous()

    def next_batch(self) -> Batch:
        return self._batch(self._take_indices())

    def val_batches(self, n_batches: int) -> Iterator[Batch]:
        total = min(len(self), n_batches * self.world_size * self.batch_size)
        mine = list(range(total))[self.rank::self.world_size]
        for i in range(0, len(mine), self.batch_size):
            yield self._batch(mine[i:i + self.batch_size])


def make_loader(folder: str | Path, split: str, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                world_size: int = 1, manifest: dict | None = None,
                vocab_size: int | None = None) -> PretrainLoader | SFTLoader:
    """A PretrainLoader or SFTLoader, by the manifest's kind."""
    manifest = manifest or read_manifest(folder)
    common = {"seed": seed, "rank": rank, "world_size": world_size, "manifest": manifest, "vocab_size": vocab_size}
    if manifest["kind"] == "sft":
        return SFTLoader(folder, split, batch_size, **common)
    return PretrainLoader(folder, split, seq_len, batch_size, **common)
