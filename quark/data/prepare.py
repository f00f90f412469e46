"""`quark prepare`: a mixture + a tokenizer -> a data folder of token shards (`manifest.json`, `train/`, `val/`),
which `quark.data.loader` reads.

Pre-training (`kind = "pretrain"`): each source gets `tokens * weight / total_weight` tokens (train and val
together), read in its seeded document order, repeated for more epochs when a finite source runs out, the last
document cut so the count is exact: weights are honoured by token count. Val takes every k-th document
(k = 1 / val_fraction) of a source's first epoch until it holds `val_fraction` of the source's tokens; later
epochs skip those documents, so val text never reaches train (a source of fewer than k documents has no val).
Each document's ids are followed by `<|endoftext|>` (id 0) and stored as uint16 in `train/shard_NNNNN.npy` /
`val/shard_NNNNN.npy`; a shard holds one source's tokens (the loader samples windows over all shards, so
proportions are what matter).
SFT (`kind = "sft"`): conversations rendered by `Tokenizer.render_chat` (the one ChatML renderer), shuffled with
the seed and packed whole into rows of `seq_len + 1` int32 ids with a uint8 loss mask (padding: id 0, mask 0).
Choices:
- Parallel: documents are tokenized in batches with `encode_batch` (Rust threads on all cores); math is generated
  by a process pool. Deterministic: same inputs -> byte-identical shards.
- Resumable: `.prepare_state.json` (`quark.data.prepare_state`) records the shards written and each source's
  cursor (epoch, documents read); a rerun with the same inputs continues from there, a different preparation in
  the same folder is refused. Shards and the manifest are written to a temp file and renamed, so none is ever
  half-written. The manifest records each shard file's SHA-256 (hashed as written), which the loader checks.
- Bad input: a malformed record stops the run naming file and line, or with `skip_bad` is counted; empty
  documents are skipped and counted; documents containing evaluation items are removed (`quark.data.dedup`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io import atomic_write_bytes
from ..tokenizer import Tokenizer, check_message
from .dedup import contaminated, eval_texts
from .mixture import Mixture
from .prepare_state import SPLITS, PrepareState, SourceProgress, SplitRows
from .sources import BadRecord, Source, flatten_chat

BATCH_DOCS, BATCH_CHARS = 512, 4_000_000


def npy_bytes(arr: np.ndarray) -> tuple[bytes, str]:
    """The .npy file of `arr` and its SHA-256 (hex), which the manifest records."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue(), hashlib.sha256(buf.getbuffer()).hexdigest()


def save_npy(path: Path, arr: np.ndarray) -> str:
    """Write `arr` as .npy atomically; returns its SHA-256."""
    data, digest = npy_bytes(arr)
    atomic_write_bytes(path, data)
    return digest


def _is_val(key: str, seed: int, val_fraction: float) -> bool:
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def encode_texts(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Plain-text ids of many documents, on all cores (Rust threads). Marker text stays text, as in
    `Tokenizer.encode`; `encode_batch_fast` (tokenizers >= 0.21) skips the offsets we do not need."""
    fast = getattr(tok.plain, "encode_batch_fast", None)
    if fast is None:
        return tok.encode_batch(texts)
    return [e.ids for e in fast(texts, add_special_tokens=False)]


def batches(docs: Iterable, max_docs: int = BATCH_DOCS,
            max_chars: Callable[[], int] = lambda: BATCH_CHARS) -> Iterator[list]:
    """Lists of documents; `max_chars()` is asked per batch, so a source near its budget reads little more."""
    batch, chars, limit = [], 0, max_chars()
    for d in docs:
        batch.append(d)
        chars += len(d) if isinstance(d, str) else 0
        if len(batch) >= max_docs or chars >= limit:
            yield batch
            batch, chars, limit = [], 0, max_chars()
    if batch:
        yield batch


def fingerprint(mixture: Mixture, tok: Tokenizer, **opts) -> dict:
    return {"mixture": mixture.fingerprint(), "tokenizer": tok.sha256(), **opts}


@dataclass
class _Job:
    """One preparation: its inputs, its checked options, the evaluation texts to remove, and its progress."""

    mixture: Mixture
    tok: Tokenizer
    out: Path
    tokens: int | None
    seed: int
    val_fraction: float
    skip_bad: bool
    shard_tokens: int
    seq_len: int
    workers: int
    progress: bool
    texts: frozenset = frozenset()
    state: PrepareState | None = None


# ---- entry point ------------------------------------------------------------------------------------------------------
def prepare(mixture: Mixture, tokenizer: Tokenizer, out: str | Path, *, tokens: int | None = None, seed: int = 0,
            val_fraction: float | None = None, skip_bad: bool = False, shard_tokens: int = 1 << 24,
            seq_len: int = 2048, workers: int | None = None, progress: bool = True, dedup: bool = True) -> dict:
    """Run the whole preparation (or finish an interrupted one); returns the manifest."""
    if val_fraction is None:
        val_fraction = 0.01 if mixture.kind == "pretrain" else 0.02
    job = _Job(mixture=mixture, tok=tokenizer, out=Path(out), tokens=tokens if tokens is not None else mixture.tokens,
               seed=seed, val_fraction=val_fraction, skip_bad=skip_bad, shard_tokens=shard_tokens, seq_len=seq_len,
               workers=workers or os.cpu_count() or 1, progress=progress)
    _check_options(job)
    for src in mixture.sources:  # open remote datasets before any work, so a missing one fails at once
        if src.type == "hf" and src.weight > 0:
            next(iter(src.documents(seed)), None)
    for split in SPLITS:
        (job.out / split).mkdir(parents=True, exist_ok=True)
    fp = fingerprint(mixture, tokenizer, kind=mixture.kind, tokens=job.tokens, seed=seed, val_fraction=val_fraction,
                     shard_tokens=shard_tokens, seq_len=seq_len if mixture.kind == "sft" else None, dedup=dedup)
    job.state = PrepareState(job.out, fp)
    job.texts = eval_texts() if dedup else frozenset()
    t0 = time.time()
    if mixture.kind == "pretrain":
        _prepare_pretrain(job)
    else:
        _prepare_sft(job)
    return _write_manifest(job, time.time() - t0)


def _check_options(job: _Job) -> None:
    mixture, tokens = job.mixture, job.tokens
    if not 0 <= job.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {job.val_fraction}")
    if tokens is not None and tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {tokens}")
    if mixture.kind == "pretrain":
        if tokens is None:
            raise ValueError(f"mixture {mixture.name!r}: give a token budget (--tokens N or tokens = N in the file)")
        if job.tok.base_vocab_size > 65536:  # SFT rows are int32 and take any vocabulary
            raise ValueError(f"tokenizer vocabulary of {job.tok.base_vocab_size:,} ids does not fit pre-training's "
                             "uint16 shards (at most 65,536 ids); SFT data (--sft) takes any vocabulary")
    else:
        if not 8 <= job.seq_len <= 1 << 20:
            raise ValueError(f"--seq-len must be in [8, 1048576], got {job.seq_len}")
        endless = [s.name for s in mixture.sources if s.is_endless and not s.options.get("max_documents")]
        if tokens is None and endless:
            raise ValueError(f"source(s) {', '.join(endless)} never end: give --tokens or max_documents in the mixture")
    if job.shard_tokens < 1024:
        raise ValueError(f"--shard-tokens must be at least 1024, got {job.shard_tokens}")


# ---- pre-training --------------------------------------------------------------------------------------------------
def _classify(doc: object, skip_bad: bool, texts: frozenset, st: SourceProgress) -> str | None:
    """-> the document's text, or None when it is skipped (and counted)."""
    first = st.epoch == 0  # skips are counted once, not again in each repeat
    if isinstance(doc, BadRecord):
        if not skip_bad:
            raise ValueError(f"{doc} (use --skip-bad to skip and count such records)")
        st.bad_skipped += first
        return None
    if isinstance(doc, list):
        doc = flatten_chat(doc) if doc else ""
    if not isinstance(doc, str) or not doc.strip():
        st.empty_skipped += first
        return None
    if texts and contaminated(doc, texts):
        st.eval_removed += first
        return None
    return doc


def _prepare_pretrain(job: _Job) -> None:
    W = job.mixture.total_weight
    bar = tqdm(total=job.tokens, unit="tok", unit_scale=True, desc="prepare", disable=not job.progress,
               smoothing=0.1)
    pool = None
    try:
        for src in job.mixture.sources:
            st = job.state.source(src.name)
            share = job.tokens * src.weight / W
            val_target = round(share * job.val_fraction)
            train_target = round(share) - val_target
            bar.update(st.train_tokens + st.val_tokens)
            if st.done or train_target <= 0:
                st.done = True
                continue
            if src.is_generated and pool is None and job.workers > 1:
                from .mathgen import math_pool
                pool = math_pool(job.workers)
            writer = _ShardWriter(job, src, {"train": train_target, "val": val_target}, bar)
            _pretrain_source(writer, pool)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


@dataclass
class _Pending:
    """Tokens of one split read but not yet written to a shard."""

    arrays: list[np.ndarray] = field(default_factory=list)
    tokens: int = 0
    bytes: int = 0


class _ShardWriter:
    """One pre-training source's way to its shards: its token targets per split, the tokens read but not yet
    written, and the shard writes (each followed by a state save, so a rerun resumes after the last shard)."""

    def __init__(self, job: _Job, src: Source, targets: dict[str, int], bar: tqdm):
        self.job, self.src, self.targets, self.bar = job, src, targets, bar
        self.st = job.state.source(src.name)
        self.pending = {split: _Pending() for split in SPLITS}

    def room(self, split: str) -> int:
        """Tokens `split` may still take."""
        return self.targets[split] - self.st.tokens(split) - self.pending[split].tokens

    def add(self, split: str, text: str, ids: list[int]) -> bool:
        """Buffer one document's ids (plus <|endoftext|>), cut to the room left; False when there is none."""
        room = self.room(split)
        if room <= 0:
            return False
        tok = self.job.tok
        ids.append(tok.eot_id)
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        if len(ids) > room:
            ids = ids[:room]
            nbytes = len(tok.decode([i for i in ids if i != tok.eot_id]).encode("utf-8", "surrogatepass"))
            self.st.truncated += 1
        p = self.pending[split]
        p.arrays.append(np.asarray(ids, dtype=np.uint16))
        p.tokens, p.bytes = p.tokens + len(ids), p.bytes + nbytes
        self.st.documents += 1
        self.st.bytes += nbytes
        self.bar.update(len(ids))
        return True

    def flush(self, final: bool) -> None:
        state = self.job.state
        for split in SPLITS:
            p = self.pending[split]
            if p.tokens == 0:
                continue
            name = f"shard_{len(state.shards[split]):05d}.npy"
            arr = np.concatenate(p.arrays).astype(np.uint16)
            digest = save_npy(self.job.out / split / name, arr)
            state.shards[split].append({"file": name, "source": self.src.name, "tokens": p.tokens,
                                        "bytes": p.bytes, "max_id": int(arr.max()), "sha256": digest})
            self.st.add(split, p.tokens, p.bytes)
            self.pending[split] = _Pending()
        self.st.done = final
        state.save()

    def need_chars(self) -> int:
        """Characters to read next: ~4 a token, a little over what the source still needs."""
        left = self.room("train")
        return int(max(16_384, min(BATCH_CHARS, 5 * left, 4 * self.job.shard_tokens)))


def _route(w: _ShardWriter, batch: list, every: int) -> list[tuple[str, str]]:
    """(split, text) of the documents of `batch` to keep: every k-th of the first epoch goes to val while val has
    room; the first epoch's val documents are skipped in later epochs."""
    st, kept = w.st, []
    for j, doc in enumerate(batch):
        idx = st.docs + j
        val_slot = every > 0 and idx % every == every - 1
        if st.epoch > 0 and val_slot and idx < st.val_docs:
            continue  # a val document of the first epoch: never repeated into train
        text = _classify(doc, w.job.skip_bad, w.job.texts, st)
        if text is None:
            continue
        to_val = val_slot and st.epoch == 0 and st.val_tokens + w.pending["val"].tokens < w.targets["val"]
        if to_val:
            st.val_docs = idx + 1
        kept.append(("val" if to_val else "train", text))
    st.docs += len(batch)
    return kept


def _pretrain_source(w: _ShardWriter, pool: Pool | None) -> None:
    job, src, st = w.job, w.src, w.st
    every = max(2, round(1 / job.val_fraction)) if job.val_fraction > 0 else 0
    while True:  # epochs
        produced = False
        docs = src.documents(job.seed, st.epoch, st.docs, pool)
        for batch in batches(docs, 64 if src.is_generated else BATCH_DOCS, w.need_chars):
            kept = _route(w, batch, every)
            ids_list = encode_texts(job.tok, [t for _, t in kept]) if kept else []
            for (split, text), ids in zip(kept, ids_list):
                produced = (w.add(split, text, ids) and split == "train") or produced
            if w.room("train") <= 0:
                w.flush(final=True)
                return
            if max(p.tokens for p in w.pending.values()) >= job.shard_tokens:
                w.flush(final=False)
        if not produced and st.train_tokens + w.pending["train"].tokens == 0:
            raise ValueError(f"source {src.name!r} yielded no usable documents (after skipping empty, bad and "
                             f"eval-contaminated ones: {st.empty_skipped}, {st.bad_skipped}, {st.eval_removed})")
        if not produced and st.epoch > 0:
            raise ValueError(f"source {src.name!r}: an epoch added no training tokens")
        st.epoch += 1  # a finite source ran out: repeat it
        st.epochs = st.epoch + 1
        st.docs = 0


# ---- SFT -------------------------------------------------------------------------------------------------------------
def check_conversation(conv: object, where: str) -> list[dict]:
    """Validate an OpenAI-format conversation; raises BadRecord naming `where` and the problem."""
    if isinstance(conv, BadRecord):
        raise conv
    if not isinstance(conv, list):
        raise BadRecord(where, "expected a list of messages")
    if not conv:
        raise BadRecord(where, "empty conversation")
    for i, m in enumerate(conv):
        try:
            check_message(m, i)
        except ValueError as e:
            raise BadRecord(where, str(e)) from None
    if not any(m["role"] == "assistant" for m in conv):
        raise BadRecord(where, "conversation has no assistant turn (nothing to train on)")
    return conv


def _prepare_sft(job: _Job) -> None:
    convs: dict[str, list] = {"train": [], "val": []}
    for src in job.mixture.sources:
        _render_source(job, src, convs)
    for split, items in convs.items():
        _write_sft_split(job, split, items)


def _render_source(job: _Job, src: Source, convs: dict[str, list]) -> None:
    """Render a source's conversations into `convs` (per split), for more epochs until its token share is met."""
    st = job.state.source(src.name)
    for k in ("documents", "bytes", "empty_skipped", "bad_skipped", "eval_removed", "truncated", "too_long",
              "train_tokens", "val_tokens", "train_bytes", "val_bytes"):
        setattr(st, k, 0)  # counted afresh: SFT renders every source again on a rerun
    target = None if job.tokens is None else round(job.tokens * src.weight / job.mixture.total_weight)
    cap = src.options.get("max_documents")
    got, epoch = 0, 0
    bar = tqdm(desc=f"render {src.name}", unit="conv", disable=not job.progress)
    while True:
        produced = False
        for i, conv in enumerate(src.documents(job.seed, epoch, 0, None)):
            where = getattr(conv, "where", None) or f"source {src.name!r} conversation {i + 1}"
            row = _render_conversation(job, st, conv, where, epoch)
            if row is None:
                continue
            convs[row[0]].append(row[1:])
            got += len(row[1])
            produced = True
            bar.update(1)
            if (target is not None and got >= target) or (cap and st.documents >= cap):
                break
        else:
            if target is not None and got < target and produced:
                epoch += 1
                st.epochs = epoch + 1
                continue
        break
    bar.close()
    if st.documents == 0:
        raise ValueError(f"source {src.name!r} yielded no usable conversations")


def _render_conversation(job: _Job, st: SourceProgress, conv: object, where: str,
                         epoch: int) -> tuple[str, list[int], list[int]] | None:
    """-> (split, ids, mask) of one conversation, or None when it is skipped (and counted)."""
    try:
        conv = check_conversation(conv, where)
    except BadRecord as e:
        if str(e).endswith("empty conversation") and job.skip_bad:
            st.empty_skipped += 1
            return None
        if not job.skip_bad:
            raise ValueError(f"{e} (use --skip-bad to skip and count such records)") from None
        st.bad_skipped += 1
        return None
    if job.texts and contaminated(conv, job.texts):
        st.eval_removed += 1
        return None
    key = json.dumps(conv, ensure_ascii=False, sort_keys=True)
    split = "val" if _is_val(key, job.seed, job.val_fraction) else "train"
    if split == "val" and epoch > 0:
        return None
    ids, mask = job.tok.render_chat(conv)
    row_len = job.seq_len + 1
    if len(ids) > row_len:
        ids, mask = ids[:row_len], mask[:row_len]
        st.truncated += 1
    if not any(mask[1:]):  # cut before any assistant token: nothing left to train on
        st.too_long += 1
        return None
    nbytes = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in conv)
    st.documents += 1
    st.bytes += nbytes
    st.add(split, len(ids), nbytes)
    return split, ids, mask


def _write_sft_split(job: _Job, split: str, items: list) -> None:
    """Shuffle, pack and write one split's conversations; shards a previous run finished are kept."""
    state, row_len = job.state, job.seq_len + 1
    random.Random(f"{job.seed}-{split}").shuffle(items)
    ids, mask = pack_rows(items, row_len)
    rows_per_shard = max(1, job.shard_tokens // row_len)
    done = {s["file"] for s in state.shards[split]}
    shards = []
    for n, start in enumerate(range(0, len(ids), rows_per_shard)):
        stem = f"sft_{n:05d}"
        fi, fm = job.out / split / f"{stem}.ids.npy", job.out / split / f"{stem}.mask.npy"
        part = ids[start:start + rows_per_shard]
        (data_ids, sha_ids), (data_mask, sha_mask) = npy_bytes(part), npy_bytes(mask[start:start + rows_per_shard])
        if f"{stem}.ids.npy" not in done or not fi.exists() or not fm.exists():  # kept ones are the same bytes
            atomic_write_bytes(fi, data_ids)
            atomic_write_bytes(fm, data_mask)
        shards.append({"file": f"{stem}.ids.npy", "mask": f"{stem}.mask.npy", "rows": len(part),
                       "max_id": int(part.max()) if part.size else -1, "sha256": sha_ids, "mask_sha256": sha_mask})
    state.shards[split] = shards
    state.sft_rows[split] = SplitRows(len(ids), int((ids != 0).sum()) if len(ids) else 0, int(mask.sum()))
    state.save()


def pack_rows(items: list[tuple[list[int], list[int]]], row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of whole conversations into rows of `row_len` (a conversation never spans two rows)."""
    places, row, used = [], 0, 0  # (row, offset) of each item
    for ids, _ in items:
        if len(ids) > row_len:
            raise ValueError(f"a conversation of {len(ids)} ids does not fit a row of {row_len}")
        if used + len(ids) > row_len:
            row, used = row + 1, 0
        places.append((row, used))
        used += len(ids)
    n_rows = row + 1 if used else row
    ids_arr = np.zeros((n_rows, row_len), dtype=np.int32)
    mask_arr = np.zeros((n_rows, row_len), dtype=np.uint8)
    for (r, o), (ids, mask) in zip(places, items):
        ids_arr[r, o:o + len(ids)] = ids
        mask_arr[r, o:o + len(mask)] = mask
    return ids_arr, mask_arr


# ---- manifest ---------------------------------------------------------------------------------------------------------
def _source_record(src: Source, st: SourceProgress) -> dict:
    return {"name": src.name, "type": src.type, "weight": src.weight, "license": src.license,
            "documents": st.documents, "tokens": st.train_tokens + st.val_tokens, "bytes": st.bytes,
            "train_tokens": st.train_tokens, "val_tokens": st.val_tokens, "epochs": st.epochs,
            "empty_skipped": st.empty_skipped, "bad_skipped": st.bad_skipped, "eval_removed": st.eval_removed,
            "truncated": st.truncated, "too_long_skipped": st.too_long}


def _split_record(job: _Job, split: str) -> dict:
    shards, state = job.state.shards[split], job.state
    if job.mixture.kind == "pretrain":
        rec = {"shards": [s["file"] for s in shards], "tokens": sum(s["tokens"] for s in shards),
               "bytes": sum(s["bytes"] for s in shards), "shard_sources": [s["source"] for s in shards],
               "shard_tokens": [s["tokens"] for s in shards]}
    else:
        rows = state.sft_rows.get(split, SplitRows())
        rec = {"shards": [s["file"] for s in shards], "mask_shards": [s["mask"] for s in shards],
               "rows": rows.rows, "tokens": rows.real_tokens, "target_tokens": rows.target_tokens,
               "bytes": sum(state.source(s.name).split_bytes(split) for s in job.mixture.sources),
               "shard_rows": [s["rows"] for s in shards]}
    if all("max_id" in s for s in shards):  # checked against the model's vocabulary before training
        rec["max_ids"] = [s["max_id"] for s in shards]
    if all("sha256" in s for s in shards):  # checked by the loader before training (quark.data.loader)
        rec["sha256"] = [s["sha256"] for s in shards]
        if job.mixture.kind == "sft":
            rec["mask_sha256"] = [s["mask_sha256"] for s in shards]
    return rec


def _write_manifest(job: _Job, seconds: float) -> dict:
    mix, tok = job.mixture, job.tok
    srcs = [_source_record(s, job.state.source(s.name)) for s in mix.sources]
    manifest = {
        "kind": mix.kind, "mixture": mix.name, "tokenizer_sha256": tok.sha256(), "vocab_size": tok.vocab_size,
        "seed": job.seed, "dtype": "uint16" if mix.kind == "pretrain" else "int32", "sources": srcs,
        "unavailable": [{k: d[k] for k in ("name", "weight", "reason")} for d in mix.dropped],
        "splits": {split: _split_record(job, split) for split in SPLITS},
        "eval_dedup_removed": sum(s["eval_removed"] for s in srcs),
        "val_fraction": job.state.fingerprint["val_fraction"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 2),
    }
    if mix.kind == "sft":
        manifest["seq_len"] = job.seq_len
        manifest["mask_dtype"] = "uint8"
    atomic_write_bytes(job.out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return manifest
