"""Training data loaders: windows are true slices of the shards, every window once per epoch, deterministic for a
seed, DDP ranks split each global batch exactly, state restore is exact, SFT rows keep their loss masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quark.data.loader import PretrainLoader, SFTLoader, make_loader, read_manifest


def pretrain_folder(tmp_path, sizes=(1000, 37, 613), val=300, dtype=np.uint16):
    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    names, streams = [], []
    for i, n in enumerate(sizes):
        a = rng.integers(0, 500, n).astype(dtype)
        np.save(tmp_path / "train" / f"shard_{i:05d}.npy", a)
        names.append(f"shard_{i:05d}.npy")
        streams.append(a)
    np.save(tmp_path / "val" / "shard_00000.npy", rng.integers(0, 500, val).astype(dtype))
    manifest = {"kind": "pretrain", "vocab_size": 512, "splits": {
        "train": {"shards": names, "tokens": sum(sizes), "bytes": 4 * sum(sizes)},
        "val": {"shards": ["shard_00000.npy"], "tokens": val, "bytes": 4 * val}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path, streams


def test_windows_are_slices_and_each_epoch_covers_every_window_once(tmp_path):
    folder, streams = pretrain_folder(tmp_path)
    T = 50
    ld = PretrainLoader(folder, "train", T, batch_size=4, seed=3)
    # (1000-1)//50 = 19, shard of 37 tokens has none, (613-1)//50 = 12
    assert len(ld) == 19 + 0 + 12
    expected = {tuple(s[k * T:k * T + T + 1]) for s in streams for k in range((len(s) - 1) // T)}
    seen = []
    for _ in range(len(ld) // 4 + 1):
        x, y, m = ld.next_batch()
        assert m is None and x.shape == y.shape == (4, T) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        seen += [tuple(torch.cat([xi, yi[-1:]]).tolist()) for xi, yi in zip(x, y)]
    assert set(seen[:len(ld)]) == expected and len(set(seen[:len(ld)])) == len(ld)
    assert isinstance(ld.shards[0], np.memmap)  # read from disk, not loaded


def test_order_depends_on_seed_and_restores_exactly(tmp_path):
    folder, _ = pretrain_folder(tmp_path)
    a, b = (PretrainLoader(folder, "train", 20, 3, seed=1) for _ in range(2))
    c = PretrainLoader(folder, "train", 20, 3, seed=2)
    assert all(torch.equal(a.next_batch()[0], b.next_batch()[0]) for _ in range(5))
    assert not torch.equal(a.next_batch()[0], c.next_batch()[0])
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON, like in a checkpoint
    want = [a.next_batch()[0] for _ in range(40)]  # crosses epoch boundaries
    d = PretrainLoader(folder, "train", 20, 3, seed=1)
    d.load_state_dict(state)
    assert all(torch.equal(w, d.next_batch()[0]) for w in want)
    with pytest.raises(ValueError, match="seed"):
        c.load_state_dict(state)


def test_ranks_split_the_single_process_batch(tmp_path):
    folder, _ = pretrain_folder(tmp_path)
    one = PretrainLoader(folder, "train", 16, 6, seed=5)
    ranks = [PretrainLoader(folder, "train", 16, 2, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(7):
        whole = one.next_batch()[0]
        parts = torch.cat([r.next_batch()[0] for r in ranks])
        assert torch.equal(whole, parts)
    val_one = torch.cat([x for x, _, _ in one.val_batches(2)])
    val_ranks = [torch.cat([x for x, _, _ in r.val_batches(2)]) for r in ranks]
    assert sorted(map(tuple, val_one.tolist())) == sorted(map(tuple, torch.cat(val_ranks).tolist()))


def sft_folder(tmp_path, n=10, width=33):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 500, (n, width)).astype(np.int32)
    mask = np.zeros((n, width), np.uint8)
    lengths = rng.integers(5, width, n)
    for r, L in enumerate(lengths):
        ids[r, L:] = 0
        mask[r, L // 2:L] = 1
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        np.save(tmp_path / split / "sft_00000.ids.npy", ids)
        np.save(tmp_path / split / "sft_00000.mask.npy", mask)
    manifest = {"kind": "sft", "seq_len": width - 1, "splits": {s: {"shards": ["sft_00000.ids.npy"]}
                                                                for s in ("train", "val")}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path, ids, mask


def test_sft_rows_shift_ids_and_masks_and_trim_padding(tmp_path):
    folder, ids, mask = sft_folder(tmp_path)
    ld = SFTLoader(folder, "train", batch_size=3, seed=0, trim=True)
    full = SFTLoader(folder, "train", batch_size=3, seed=0, trim=False)
    assert ld.seq_len == 32 and len(ld) == 10
    for _ in range(4):
        rows = [ld.order(ld.consumed + j) for j in range(3)]
        x, _, m = ld.next_batch()
        xf, yf, mf = full.next_batch()
        assert xf.shape == (3, 32) and x.shape[1] <= 32 and x.shape[1] % 4 == 0  # buckets of seq_len/8
        W = x.shape[1]
        assert torch.equal(xf[:, :W], x) and torch.equal(mf[:, :W], m) and not mf[:, W:].any()
        for b, r in enumerate(rows):
            assert torch.equal(xf[b], torch.from_numpy(ids[r, :-1]).long())
            assert torch.equal(yf[b], torch.from_numpy(ids[r, 1:]).long())
            assert torch.equal(mf[b], torch.from_numpy(mask[r, 1:]).bool())


def test_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        read_manifest(tmp_path / "nope")
    folder, _ = pretrain_folder(tmp_path)
    with pytest.raises(ValueError, match="needs kind 'sft'"):
        SFTLoader(folder, "train", 2)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        PretrainLoader(folder, "train", 5000, 2)
    (folder / "train" / "shard_00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard_00001.npy"):
        make_loader(folder, "train", 2, 16)
    np.save(folder / "train" / "shard_00001.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="expected a 1-D array"):
        make_loader(folder, "train", 2, 16)
