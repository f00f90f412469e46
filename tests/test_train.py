"""Training loop: config checking, schedule, a real pre-training run through the CLI, NaN stop, full disk, bad input.

Data folders are written here with numpy (stdlib Python sources encoded with the session tokenizer), following
the layout `quark.data.prepare` writes, so these tests do not depend on `quark prepare`.
"""

from __future__ import annotations

import itertools
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

from quark.data.loader import file_sha256
from quark.train.config import TrainConfig, load_config
from quark.train.optim import lr_at

ROOT = pathlib.Path(__file__).resolve().parent.parent


def write_pretrain_data(folder: pathlib.Path, tok, n_files: int = 40, n_train_shards: int = 2) -> pathlib.Path:
    """A pre-training data folder: stdlib sources -> token ids + <|endoftext|>, uint16 shards, manifest (with the
    shards' SHA-256, as `quark prepare` records them)."""
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
        splits[split] = {"shards": names, "tokens": len(ids), "bytes": sum(len(t.encode()) for t in docs),
                         "sha256": [file_sha256(folder / split / n) for n in names]}
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
        splits[split] = {"shards": ["sft_00000.ids.npy"], "tokens": int(mask[sl].sum()), "bytes": 0,
                         "sha256": [file_sha256(folder / split / "sft_00000.ids.npy")],
                         "mask_shards": ["sft_00000.mask.npy"],
                         "mask_sha256": [file_sha256(folder / split / "sft_00000.mask.npy")]}
    manifest = {"kind": "sft", "tokenizer_sha256": tok.sha256(), "vocab_size": tok.base_vocab_size, "seed": 0,
                "seq_len": seq_len, "dtype": "int32", "sources": [], "splits": splits, "eval_dedup_removed": 0,
                "created": "2026-01-01T00:00:00Z"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    tok.save(folder)
    return folder


def quark(*args, timeout=180, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "quark", *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env=env, cwd=ROOT)


def train_cfg(data, out, **kw) -> TrainConfig:
    base = dict(kind="pretrain", model="test", data=str(data), out=str(out), batch_size=4, max_steps=6,
                warmup_steps=2, log_every=1, eval_every=0, eval_batches=2, save_every=0, samples=0,
                tensorboard=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


# ---- config --------------------------------------------------------------------------------------------------
def test_config_file_and_overrides_are_checked_by_key_and_type(tmp_path):
    cfg = load_config("pretrain-tiny", ["lr=1e-3", "model=test", "compile=false", "max_minutes=5",
                                        'sample_prompts=["a", "b"]'], data="D", out="O")
    assert (cfg.lr, cfg.model, cfg.compile, cfg.max_minutes, cfg.data) == (1e-3, "test", "false", 5.0, "D")
    assert cfg.sample_prompts == ["a", "b"] and cfg.tokens_per_step == 4096  # from the packaged file
    with pytest.raises(ValueError, match="unknown key.*'learning_rate'"):
        load_config(None, ["learning_rate=1"])
    with pytest.raises(ValueError, match="key 'batch_size' must be an integer"):
        load_config(None, ["batch_size=2.5"])
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = "fast"\n')
    with pytest.raises(ValueError, match=r"bad.toml: key 'lr' must be a number"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="packaged configs: .*pretrain-tiny"):
        load_config("no-such-config")
    with pytest.raises(ValueError, match="no budget"):
        TrainConfig().check_budget()
    for name in ("pretrain-tiny", "sft-tiny", "pretrain-quark-72m", "sft-quark-72m"):
        load_config(name)


def test_schedule_warms_up_linearly_then_cosine_to_the_floor():
    lrs = [lr_at(s, 110, 1.0, 0.1, 10) for s in range(110)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    mid = 10 + 99 // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (mid - 10) / 99)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_weight_decay_only_on_matrices():
    from quark.config import QuarkConfig
    from quark.model import Quark
    from quark.train.optim import build_optimizer

    m = Quark(QuarkConfig.from_name("test"))
    opt = build_optimizer(m, 1e-3, weight_decay=0.1)
    decay, no = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no["params"])
    assert len(decay["params"]) + len(no["params"]) == len(list(m.parameters()))  # tied lm_head counted once


def test_chunked_loss_gradients_match_full_cross_entropy():
    from quark.config import QuarkConfig
    from quark.model import Quark

    m = Quark(QuarkConfig.from_name("test")).init_weights(0)
    idx, tgt = torch.randint(0, 514, (2, 40)), torch.randint(0, 514, (2, 40))
    mask = torch.rand(2, 40) > 0.4
    m.loss(idx, tgt, mask, chunk_rows=7).backward()
    ours = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), torch.where(mask, tgt, -100).flatten())
    ref.backward()
    for a, p in zip(ours, m.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


# ---- runs ----------------------------------------------------------------------------------------------------
def test_pretrain_cli_writes_the_run_folder_contract(tmp_path, tiny_tokenizer):
    data = write_pretrain_data(tmp_path / "data", tiny_tokenizer)
    out = tmp_path / "run"
    r = quark("pretrain", "--config", "pretrain-tiny", "--data", str(data), "--out", str(out), "--set", "model=test",
              "--set", "max_steps=20", "--set", "batch_size=8", "--set", "tokens_per_step=2048", "--set",
              "eval_every=10", "--set", "save_every=10", "--set", "log_every=5", "--set", "keep_last=1",
              "--set", "warmup_steps=5")
    assert r.returncode == 0, r.stderr
    assert "step 10: val loss" in r.stdout and "samples:" in r.stdout and "tok/s" in r.stdout
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000020"]  # keep_last=1
    step = out / "checkpoints" / "step_000020"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_state.json",
              "train_state.safetensors"):
        assert (step / f).exists(), f
    assert not list(step.glob("*.pt")) and not list(step.glob("*.bin"))
    assert (out / "loss.png").stat().st_size > 1000 and list((out / "tb").iterdir())
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    assert set(train[0]) == {"step", "tokens", "loss", "lr", "grad_norm", "tok_per_s", "mfu", "elapsed_s"}
    assert [r["step"] for r in train] == list(range(5, 21, 5))
    assert train[-1]["tokens"] == 20 * 2048  # 8 rows x 128 x 2 micro-batches per step
    assert [r["step"] for r in val] == [10, 20] and set(val[0]) == {"step", "val_loss", "val_bpb"}
    assert train[-1]["loss"] < train[0]["loss"] - 0.3  # it learns
    man = json.loads((data / "manifest.json").read_text())["splits"]["val"]
    assert val[-1]["val_bpb"] == pytest.approx(val[-1]["val_loss"] * man["tokens"] / (man["bytes"] * math.log(2)))
    info = json.loads((out / "run.json").read_text())
    assert set(info) == {"kind", "train_config", "model_config", "data", "data_manifest", "base", "hardware",
                         "world_size", "started", "finished", "wall_time_s", "steps", "tokens", "lora"}
    assert info["steps"] == 20 and info["tokens"] == 40960 and info["finished"] and info["base"] is None
    assert info["lora"] is None  # full training; a LoRA run records its rank, targets and base here
    from quark.weights import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(out)  # the run folder is a loadable model
    assert tok.sha256() == tiny_tokenizer.sha256() and model.config.n_layers == 2
    # running the finished run again trains nothing and keeps the checkpoint
    from quark.train.loop import train

    again = train(TrainConfig(**dict(info["train_config"], tensorboard=False, plot=False)))
    assert again["steps"] == 20 and [p.name for p in (out / "checkpoints").iterdir()] == ["step_000020"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(recs)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_tokenizer, monkeypatch):
    from quark.model import Quark
    from quark.train.loop import train

    data = write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=10)
    real_loss, calls = Quark.loss, [0]

    def loss(self, *a, **kw):
        out = real_loss(self, *a, **kw)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 5:
                return out * float("nan")
        return out

    monkeypatch.setattr(Quark, "loss", loss)
    with pytest.raises(RuntimeError, match=r"loss is nan at step 5.*last good checkpoint is .*step_000004"):
        train(train_cfg(data, tmp_path / "run", save_every=2, max_steps=10))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, tiny_tokenizer, monkeypatch):
    from quark import weights
    from quark.train.loop import train

    data = write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=10)
    run = tmp_path / "run"
    train(train_cfg(data, run, max_steps=2))
    good = run / "checkpoints" / "step_000002"
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real, n = weights.save_safetensors, [0]

    def full_disk(tensors, path, metadata=None):
        n[0] += 1
        if n[0] == 2:  # the model file is written, then the disk fills up
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(weights, "save_safetensors", full_disk)
    with pytest.raises(RuntimeError, match=r"step 4 .*No space left.*step_000002 is intact"):
        train(train_cfg(data, run, max_steps=4))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]  # no half-written folder
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_bad_input_fails_before_training(tmp_path, tiny_tokenizer):
    from quark.train.loop import train

    with pytest.raises(FileNotFoundError, match="data folder not found"):
        train(train_cfg(tmp_path / "missing", tmp_path / "run"))
    data = write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=6)
    with pytest.raises(ValueError, match=r"vocab_size=8194 embedding rows but the tokenizer has 514"):
        train(train_cfg(data, tmp_path / "run", model="tiny"))
    with pytest.raises(ValueError, match="needs a 'sft' data folder"):
        train(train_cfg(data, tmp_path / "run", kind="sft", base=str(tmp_path)))
    man = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps(dict(man, tokenizer_sha256="0" * 64)))
    with pytest.raises(ValueError, match="differs from the one the data"):
        train(train_cfg(data, tmp_path / "run"))
    r = quark("pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--set", "max_stepz=3")
    assert r.returncode == 2 and "unknown key(s) ['max_stepz']" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()


def test_time_bounded_run_plans_its_steps_and_stops(tmp_path, tiny_tokenizer):
    from quark.train.loop import train

    data = write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=10)
    info = train(train_cfg(data, tmp_path / "run", max_steps=0, max_minutes=0.04, batch_size=2, warmup_steps=3))
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step_{info['steps']:06d}" / "train_state.json")
                       .read_text())
    assert state["planned_by_time"] and state["total_steps"] >= info["steps"] >= 6
    assert info["wall_time_s"] < 0.04 * 60 + 3  # the bound, plus the final evaluation and save
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    if info["steps"] == state["total_steps"]:
        assert lrs[-1] == pytest.approx(3e-4)  # the cosine reached its floor at the planned end


@pytest.mark.gpu
def test_cuda_run_uses_bf16_compile_and_learns(tmp_path, tiny_tokenizer):
    from quark.train.loop import train

    data = write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=20)
    info = train(train_cfg(data, tmp_path / "run", device="cuda", max_steps=30, batch_size=16, eval_every=0,
                           lr=3e-3, log_every=1))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert info["steps"] == 30 and losses[-1] < losses[0] - 0.3
    assert all(r["mfu"] is None or 0 < r["mfu"] < 1 for r in recs if "loss" in r)
    assert "NVIDIA" in info["hardware"] or "x 1" in info["hardware"]
