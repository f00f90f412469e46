"""`quark prepare`: a mixture + a tokenizer -> a data folder of token shards (the BRIEF's data-folder contract).

Pre-training (`kind = "pretrain"`): each source gets `tokens * weight / total_weight` tokens (train and val
together), read in its seeded document order, repeated for more epochs when a finite source runs out, the last
document cut so the count is exact: weights are honoured by token count. Val takes every k-th document
(k = 1 / val_fraction) of a source's first epoch until it holds `val_fraction` of the source's tokens; later
epochs skip those documents, so val text never reaches train (a source of fewer than k documents has no val). Each document's ids are followed by `<|endoftext|>` (id 0) and stored as
uint16 in `train/shard_NNNNN.npy` / `val/shard_NNNNN.npy`; a shard holds one source's tokens (the loader samples
windows over all shards, so proportions are what matter).
SFT (`kind = "sft"`): conversations rendered by `Tokenizer.render_chat` (the one ChatML renderer), shuffled with
the seed and packed whole into rows of `seq_len + 1` int32 ids with a uint8 loss mask (padding: id 0, mask 0).
Choices:
- Parallel: documents are tokenized in batches with `encode_batch` (Rust threads on all cores); math is generated
  by a process pool. Deterministic: same inputs -> byte-identical shards.
- Resumable: `.prepare_state.json` records the shards written and each source's cursor (epoch, documents read);
  a rerun with the same inputs continues from there, a different preparation in the same folder is refused.
  Shards and the manifest are written to a temp file and renamed, so none is ever half-written.
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
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from ..tokenizer import Tokenizer, check_message
from .dedup import contaminated, eval_texts
from .mixture import Mixture
from .sources import BadRecord, Source, flatten_chat

STATE = ".prepare_state.json"
BATCH_DOCS, BATCH_CHARS = 512, 4_000_000


def save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


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


def _batches(docs, max_docs=BATCH_DOCS, max_chars=lambda: BATCH_CHARS):
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


class _State:
    """The resumable progress of one preparation, saved after every shard."""

    def __init__(self, out: Path, fingerprint: dict):
        self.path = out / STATE
        self.data = {"fingerprint": fingerprint, "shards": {"train": [], "val": []}, "sources": {}}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("fingerprint") != fingerprint:
                raise FileExistsError(f"{out} holds a different preparation (other mixture, tokenizer or options); "
                                      "use a new --out folder or delete it")
            self.data = old

    def source(self, name: str) -> dict:
        return self.data["sources"].setdefault(name, {
            "done": False, "epoch": 0, "docs": 0, "train_tokens": 0, "val_tokens": 0, "documents": 0,
            "bytes": 0, "train_bytes": 0, "val_bytes": 0, "empty_skipped": 0, "bad_skipped": 0, "eval_removed": 0,
            "epochs": 1, "truncated": 0, "too_long": 0, "val_docs": 0})

    def save(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.data, indent=1).encode())


def fingerprint(mixture: Mixture, tok: Tokenizer, **opts) -> dict:
    return {"mixture": mixture.fingerprint(), "tokenizer": tok.sha256(), **opts}


def prepare(mixture: Mixture, tokenizer: Tokenizer, out: str | Path, tokens: int | None = None, seed: int = 0,
            val_fraction: float | None = None, skip_bad: bool = False, shard_tokens: int = 1 << 24,
            seq_len: int = 2048, workers: int | None = None, progress: bool = True, dedup: bool = True) -> dict:
    """Run the whole preparation (or finish an interrupted one); returns the manifest."""
    out = Path(out)
    tokens = tokens if tokens is not None else mixture.tokens
    if val_fraction is None:
        val_fraction = 0.01 if mixture.kind == "pretrain" else 0.02
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if tokens is not None and tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {tokens}")
    if mixture.kind == "pretrain":
        if tokens is None:
            raise ValueError(f"mixture {mixture.name!r}: give a token budget (--tokens N or tokens = N in the file)")
        if tokenizer.base_vocab_size > 65536:
            raise ValueError(f"tokenizer base vocabulary {tokenizer.base_vocab_size} does not fit uint16 shards")
    else:
        if not 8 <= seq_len <= 1 << 20:
            raise ValueError(f"--seq-len must be in [8, 1048576], got {seq_len}")
        endless = [s.name for s in mixture.sources if s.is_endless and not s.options.get("max_documents")]
        if tokens is None and endless:
            raise ValueError(f"source(s) {', '.join(endless)} never end: give --tokens or max_documents in the mixture")
    if shard_tokens < 1024:
        raise ValueError(f"--shard-tokens must be at least 1024, got {shard_tokens}")
    for src in mixture.sources:  # open remote datasets before any work, so a missing one fails at once
        if src.type == "hf" and src.weight > 0:
            next(iter(src.documents(seed)), None)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (out / split).mkdir(exist_ok=True)
    fp = fingerprint(mixture, tokenizer, kind=mixture.kind, tokens=tokens, seed=seed, val_fraction=val_fraction,
                     shard_tokens=shard_tokens, seq_len=seq_len if mixture.kind == "sft" else None, dedup=dedup)
    state = _State(out, fp)
    texts = eval_texts() if dedup else frozenset()
    workers = workers or os.cpu_count() or 1
    t0 = time.time()
    if mixture.kind == "pretrain":
        _prepare_pretrain(mixture, tokenizer, out, tokens, seed, val_fraction, skip_bad, shard_tokens, workers,
                          progress, texts, state)
    else:
        _prepare_sft(mixture, tokenizer, out, tokens, seed, val_fraction, skip_bad, seq_len, shard_tokens,
                     workers, progress, texts, state)
    return _write_manifest(mixture, tokenizer, out, seed, seq_len, state, time.time() - t0)


# ---- pre-training --------------------------------------------------------------------------------------------------
def _classify(doc, src: Source, i: int, skip_bad: bool, texts, st: dict):
    """-> the document's text, or None when it is skipped (and counted)."""
    first = st["epoch"] == 0  # skips are counted once, not again in each repeat
    if isinstance(doc, BadRecord):
        if not skip_bad:
            raise ValueError(f"{doc} (use --skip-bad to skip and count such records)")
        st["bad_skipped"] += first
        return None
    if isinstance(doc, list):
        doc = flatten_chat(doc) if doc else ""
    if not isinstance(doc, str) or not doc.strip():
        st["empty_skipped"] += first
        return None
    if texts and contaminated(doc, texts):
        st["eval_removed"] += first
        return None
    return doc


def _prepare_pretrain(mix, tok, out, tokens, seed, vf, skip_bad, shard_tokens, workers, progress, texts, state):
    from tqdm import tqdm

    W = mix.total_weight
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="prepare", disable=not progress, smoothing=0.1)
    pool = None
    try:
        for src in mix.sources:
            st = state.source(src.name)
            share = tokens * src.weight / W
            val_target = round(share * vf)
            train_target = round(share) - val_target
            bar.update(st["train_tokens"] + st["val_tokens"])
            if st["done"] or train_target <= 0:
                st["done"] = True
                continue
            if src.is_generated and pool is None and workers > 1:
                from .mathgen import math_pool
                pool = math_pool(workers)
            _pretrain_source(src, st, tok, out, seed, vf, skip_bad, shard_tokens, train_target, val_target,
                             texts, state, bar, pool)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def _pretrain_source(src, st, tok, out, seed, vf, skip_bad, shard_tokens, train_target, val_target, texts, state,
                     bar, pool):
    bufs = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    byts = {"train": 0, "val": 0}

    def flush(final: bool):
        for split in ("train", "val"):
            if sizes[split] == 0:
                continue
            name = f"shard_{len(state.data['shards'][split]):05d}.npy"
            arr = np.concatenate(bufs[split]).astype(np.uint16)
            save_npy(out / split / name, arr)
            state.data["shards"][split].append({"file": name, "source": src.name, "tokens": sizes[split],
                                                "bytes": byts[split], "max_id": int(arr.max())})
            st[f"{split}_tokens"] += sizes[split]
            st[f"{split}_bytes"] += byts[split]
            bufs[split], sizes[split], byts[split] = [], 0, 0
        st["done"] = final
        state.save()

    eot = tok.eot_id
    every = max(2, round(1 / vf)) if vf > 0 else 0  # every k-th document of the first epoch goes to val
    while True:  # epochs
        produced = False
        docs = src.documents(seed, st["epoch"], st["docs"], pool)
        def need_chars():  # ~4 characters a token; a little over what the source still needs
            left = train_target - st["train_tokens"] - sizes["train"]
            return int(max(16_384, min(BATCH_CHARS, 5 * left, 4 * shard_tokens)))

        for batch in _batches(docs, 64 if src.is_generated else BATCH_DOCS, need_chars):
            kept = []
            for j, doc in enumerate(batch):
                idx = st["docs"] + j
                val_slot = every > 0 and idx % every == every - 1
                if st["epoch"] > 0 and val_slot and idx < st["val_docs"]:
                    continue  # a val document of the first epoch: never repeated into train
                text = _classify(doc, src, idx, skip_bad, texts, st)
                if text is None:
                    continue
                to_val = val_slot and st["epoch"] == 0 and st["val_tokens"] + sizes["val"] < val_target
                if to_val:
                    st["val_docs"] = idx + 1
                kept.append(("val" if to_val else "train", text))
            st["docs"] += len(batch)
            ids_list = encode_texts(tok, [t for _, t in kept]) if kept else []
            for (split, text), ids in zip(kept, ids_list):
                target = train_target if split == "train" else val_target
                room = target - st[f"{split}_tokens"] - sizes[split]
                if room <= 0:
                    continue
                ids.append(eot)
                nbytes = len(text.encode("utf-8", "surrogatepass"))
                if len(ids) > room:
                    ids = ids[:room]
                    nbytes = len(tok.decode([i for i in ids if i != eot]).encode("utf-8", "surrogatepass"))
                    st["truncated"] += 1
                bufs[split].append(np.asarray(ids, dtype=np.uint16))
                sizes[split] += len(ids)
                byts[split] += nbytes
                st["documents"] += 1
                st["bytes"] += nbytes
                bar.update(len(ids))
                produced = produced or split == "train"
            if st["train_tokens"] + sizes["train"] >= train_target:
                flush(final=True)
                return
            if sizes["train"] >= shard_tokens or sizes["val"] >= shard_tokens:
                flush(final=False)
        if not produced and st["train_tokens"] + sizes["train"] == 0:
            raise ValueError(f"source {src.name!r} yielded no usable documents (after skipping empty, bad and "
                             f"eval-contaminated ones: {st['empty_skipped']}, {st['bad_skipped']}, {st['eval_removed']})")
        if not produced and st["epoch"] > 0:
            raise ValueError(f"source {src.name!r}: an epoch added no training tokens")
        st["epoch"] += 1  # a finite source ran out: repeat it
        st["epochs"] = st["epoch"] + 1
        st["docs"] = 0


# ---- SFT -------------------------------------------------------------------------------------------------------------
def check_conversation(conv, where: str) -> list[dict]:
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


def _prepare_sft(mix, tok, out, tokens, seed, vf, skip_bad, seq_len, shard_tokens, workers, progress, texts,
                 state):
    from tqdm import tqdm

    W = mix.total_weight
    row_len = seq_len + 1
    convs = {"train": [], "val": []}
    pool = None
    for src in mix.sources:
        st = state.source(src.name)
        for k in ("documents", "bytes", "empty_skipped", "bad_skipped", "eval_removed", "truncated", "too_long",
                  "train_tokens", "val_tokens", "train_bytes", "val_bytes"):
            st[k] = 0
        target = None if tokens is None else round(tokens * src.weight / W)
        cap = src.options.get("max_documents")
        got, epoch = 0, 0
        bar = tqdm(desc=f"render {src.name}", unit="conv", disable=not progress)
        while True:
            produced = False
            for i, conv in enumerate(src.documents(seed, epoch, 0, pool)):
                where = getattr(conv, "where", None) or f"source {src.name!r} conversation {i + 1}"
                try:
                    conv = check_conversation(conv, where)
                except BadRecord as e:
                    if str(e).endswith("empty conversation") and skip_bad:
                        st["empty_skipped"] += 1
                        continue
                    if not skip_bad:
                        raise ValueError(f"{e} (use --skip-bad to skip and count such records)") from None
                    st["bad_skipped"] += 1
                    continue
                if texts and contaminated(conv, texts):
                    st["eval_removed"] += 1
                    continue
                key = json.dumps(conv, ensure_ascii=False, sort_keys=True)
                split = "val" if _is_val(key, seed, vf) else "train"
                if split == "val" and epoch > 0:
                    continue
                ids, mask = tok.render_chat(conv)
                if len(ids) > row_len:
                    ids, mask = ids[:row_len], mask[:row_len]
                    st["truncated"] += 1
                if not any(mask[1:]):  # cut before any assistant token: nothing left to train on
                    st["too_long"] += 1
                    continue
                convs[split].append((ids, mask))
                nbytes = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in conv)
                st["documents"] += 1
                st["bytes"] += nbytes
                st[f"{split}_tokens"] += len(ids)
                st[f"{split}_bytes"] += nbytes
                got += len(ids)
                produced = True
                bar.update(1)
                if (target is not None and got >= target) or (cap and st["documents"] >= cap):
                    break
            else:
                if target is not None and got < target and produced:
                    epoch += 1
                    st["epochs"] = epoch + 1
                    continue
            break
        bar.close()
        if st["documents"] == 0:
            raise ValueError(f"source {src.name!r} yielded no usable conversations")
    for split, items in convs.items():
        random.Random(f"{seed}-{split}").shuffle(items)
        ids, mask = pack_rows(items, row_len)
        rows_per_shard = max(1, shard_tokens // row_len)
        shards = []
        for n, start in enumerate(range(0, len(ids), rows_per_shard)):
            stem = f"sft_{n:05d}"
            fi, fm = out / split / f"{stem}.ids.npy", out / split / f"{stem}.mask.npy"
            done = {s["file"] for s in state.data["shards"][split]}
            if f"{stem}.ids.npy" not in done or not fi.exists() or not fm.exists():
                save_npy(fi, ids[start:start + rows_per_shard])
                save_npy(fm, mask[start:start + rows_per_shard])
            part = ids[start:start + rows_per_shard]
            shards.append({"file": f"{stem}.ids.npy", "mask": f"{stem}.mask.npy", "rows": len(part),
                           "max_id": int(part.max()) if part.size else -1})
        state.data["shards"][split] = shards
        state.data[f"{split}_rows"] = len(ids)
        state.data[f"{split}_real_tokens"] = int((ids != 0).sum()) if len(ids) else 0
        state.data[f"{split}_target_tokens"] = int(mask.sum())
        state.save()


def pack_rows(items: list[tuple[list[int], list[int]]], row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of whole conversations into rows of `row_len` (a conversation never spans two rows)."""
    rows_ids, rows_mask = [], []
    cur_ids, cur_mask = [], []
    for ids, mask in items:
        if len(cur_ids) + len(ids) > row_len:
            rows_ids.append(cur_ids)
            rows_mask.append(cur_mask)
            cur_ids, cur_mask = [], []
        cur_ids = cur_ids + list(ids)
        cur_mask = cur_mask + list(mask)
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_mask.append(cur_mask)
    ids_arr = np.zeros((len(rows_ids), row_len), dtype=np.int32)
    mask_arr = np.zeros((len(rows_ids), row_len), dtype=np.uint8)
    for r, (a, m) in enumerate(zip(rows_ids, rows_mask)):
        ids_arr[r, :len(a)] = a
        mask_arr[r, :len(m)] = m
    return ids_arr, mask_arr


# ---- manifest ---------------------------------------------------------------------------------------------------------
def _write_manifest(mix: Mixture, tok: Tokenizer, out: Path, seed: int, seq_len: int, state: _State,
                    seconds: float) -> dict:
    srcs = []
    for s in mix.sources:
        st = state.source(s.name)
        srcs.append({"name": s.name, "type": s.type, "weight": s.weight, "license": s.license,
                     "documents": st["documents"], "tokens": st["train_tokens"] + st["val_tokens"],
                     "bytes": st["bytes"], "train_tokens": st["train_tokens"], "val_tokens": st["val_tokens"],
                     "epochs": st["epochs"], "empty_skipped": st["empty_skipped"], "bad_skipped": st["bad_skipped"],
                     "eval_removed": st["eval_removed"], "truncated": st["truncated"],
                     "too_long_skipped": st.get("too_long", 0)})
    splits = {}
    for split in ("train", "val"):
        shards = state.data["shards"][split]
        if mix.kind == "pretrain":
            splits[split] = {"shards": [s["file"] for s in shards], "tokens": sum(s["tokens"] for s in shards),
                             "bytes": sum(s["bytes"] for s in shards),
                             "shard_sources": [s["source"] for s in shards],
                             "shard_tokens": [s["tokens"] for s in shards]}
        else:
            splits[split] = {"shards": [s["file"] for s in shards], "mask_shards": [s["mask"] for s in shards],
                             "rows": state.data.get(f"{split}_rows", 0),
                             "tokens": state.data.get(f"{split}_real_tokens", 0),
                             "target_tokens": state.data.get(f"{split}_target_tokens", 0),
                             "bytes": sum(state.source(s.name)[f"{split}_bytes"] for s in mix.sources),
                             "shard_rows": [s["rows"] for s in shards]}
        if all("max_id" in s for s in shards):  # checked against the model's vocabulary before training
            splits[split]["max_ids"] = [s["max_id"] for s in shards]
    manifest = {
        "kind": mix.kind, "mixture": mix.name, "tokenizer_sha256": tok.sha256(), "vocab_size": tok.vocab_size,
        "seed": seed, "dtype": "uint16" if mix.kind == "pretrain" else "int32", "sources": srcs,
        "unavailable": [{k: d[k] for k in ("name", "weight", "reason")} for d in mix.dropped], "splits": splits,
        "eval_dedup_removed": sum(s["eval_removed"] for s in srcs), "val_fraction": state.data["fingerprint"]["val_fraction"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 2),
    }
    if mix.kind == "sft":
        manifest["seq_len"] = seq_len
        manifest["mask_dtype"] = "uint8"
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return manifest
