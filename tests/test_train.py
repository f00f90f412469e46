"""Training loop: config checking, schedule, a real pre-training run through the CLI, NaN stop, full disk, bad input.

Data folders are written here with numpy (stdlib Python sources encoded with the session tokenizer), following
the BRIEF's contract, so these tests do not depend on `quark prepare`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

from quark.train.config import TrainConfig, load_config
from quark.train.optim import lr_at

ROOT = pathlib.Path(__file__).resolve().parent.parent


def write_pretrain_data(folder: pathlib.Path, tok, n_files: int = 40, n_train_shards: int = 2) -> pathlib.Path:
    """A pre-training data folder: stdlib sources -> token ids + <|endoftext|>, uint16 shards, manifest."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace")[:6000] for p in sorted(stdlib.glob("*.py"))[60:60 + n_files]]
    val_texts, train_texts = texts[:4], texts[4:]
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, docs, n_shards in (("train", train_texts, n_train_shards), ("val", val_texts, 1)):
        (folder / split).mkdir(exist_ok=True)
        ids = np.concatenate([np.array(tok.encode(t) + [tok.eot_id], dtype=np.uint16) for t in docs])
        names = []
        for i, part in enumerate(np.array_split(ids, n_shards)):
            names.append(f"shard_{i:05d}.npy")
            np.save(folder / split / names[-1], part)
        splits[split] = {"shards": names, "tokens": int(len(ids)), "bytes": sum(len(t.encode()) for t in docs)}
    manifest = {"kind": "pretrain", "tokenizer_sha256": tok.sha256(), "vocab_size": tok.base_vocab_size, "seed": 0,
                "dtype": "uint16", "sources": [{"name": "stdlib", "weight": 1.0, "license": "PSF", "documents":
                                                len(texts), "tokens": 0, "bytes": 0}],
                "splits": splits, "eval_dedup_removed": 0, "created": "2026-01-01T00:00:00Z"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    tok.save(folder)
    return folder


def write_sft_data(folder: pathlib.Path, tok, conversations: list, seq_len: int, n_val: int = 4) -> pathlib.Path:
    """An SFT data folder: conversations rendered with the one ChatML renderer, padded rows of seq_len + 1."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, masks = [], []
    for conv in conversations:
        ids, mask = tok.render_chat(conv)
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        pad = seq_len + 1 - len(ids)
        rows.append(ids + [0] * pad)
        masks.append(mask + [0] * pad)
    ids, mask = np.array(rows, dtype=np.int32), np.array(masks, dtype=np.uint8)
    splits = {}
    for split, sl in (("train", slice(n_val, None)), ("val", slice(0, n_val))):
        (folder / split).mkdir(exist_ok=True)
        np.save(folder / split / "sft_00000.ids.npy", ids[sl])
        np.save(folder / split / "sft_00000.mask.npy", mask[sl])
        splits[split] = {"shards": ["sft_00000.ids.npy"], "tokens": int(mask[sl].sum()), "bytes": 0}
    manifest = {"kind": "sft", "tokenizer_sha256": tok.sha256(), "vocab_size": tok.base_vocab_size, "seed": 0,
                "seq_len": seq_len, "dtype": "int32", "sources": [], "splits": splits, "eval_dedup_removed": 0,
                "created": "2026-01-01T00:00:00Z"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    tok.save(folder)
    return folder


def quark(*args, timeout=180, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "quark", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
