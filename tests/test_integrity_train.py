"""Integrity of training runs: a resume skips checkpoints that fail verification (flipped bytes, NaN weights,
truncated files) and uses the newest good one; "last good checkpoint" names one that verifies; weights holding
NaN/Inf are never written as a checkpoint; a run whose every checkpoint is bad stops with one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quark.train import checkpoint as ckpt
from quark.weights import HASH_KEY, read_safetensors, tensors_sha256
from tests.test_integrity_weights import flip_mantissa_bytes
from tests.test_train import train_cfg, write_pretrain_data


@pytest.fixture
def data(tmp_path, tiny_tokenizer):
    return write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=10)


def steps(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def nan_weights(step_dir):
    """NaN in the embedding, saved with a hash that matches (as a tool that trusts its input would write it)."""
    f = step_dir / "model.safetensors"
    sd = read_safetensors(f)
    sd["model.embed_tokens.weight"][0, :4] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt", HASH_KEY: tensors_sha256(sd)})


@pytest.mark.parametrize("damage", ["flip", "nan", "truncate"])
def test_resume_skips_a_bad_newest_checkpoint_and_repeats_the_good_run(tmp_path, data, capsys, damage):
    from quark.train.loop import train

    run = tmp_path / "run"
    cfg = train_cfg(data, run, max_steps=6, save_every=2, keep_last=3)
    train(cfg)
    assert steps(run) == ["step_000002", "step_000004", "step_000006"]
    before = losses(run)
    bad = run / "checkpoints" / "step_000006"
    f = bad / ("train_state.safetensors" if damage == "truncate" else "model.safetensors")
    if damage == "flip":
        flip_mantissa_bytes(f, "model.layers.1.self_attn.q_proj.weight")
    elif damage == "nan":
        nan_weights(bad)
    else:
        f.write_bytes(f.read_bytes()[:-64])
    capsys.readouterr()
    train(cfg)  # the same command again: the finished run's last checkpoint is bad, so steps 5-6 are redone
    out, err = capsys.readouterr()
    why = {"flip": "content hash mismatch", "nan": "tensor model.embed_tokens.weight holds 4 non-finite",
           "truncate": "not a readable safetensors file"}[damage]
    assert f"warning: skipping checkpoint {bad}: {f}: {why}" in err
    assert f"moved it to {run / 'checkpoints' / 'corrupt-step_000006'}" in err
    assert f"resuming from {run / 'checkpoints' / 'step_000004'} (step 4," in out
    assert steps(run) == ["corrupt-step_000006", "step_000002", "step_000004", "step_000006"]
    assert losses(run) == before  # steps 5 and 6 redone from step 4 repeat the first run's losses exactly
    ckpt.verify_checkpoint(run / "checkpoints" / "step_000006")


def test_a_set_aside_checkpoint_is_kept_and_not_counted_by_keep_last(tmp_path, data, capsys):
    """keep_last=1 after a corrupt step 4 was set aside: the new step 4 and then 5 are kept, the corrupt one too."""
    from quark.train.loop import train

    run = tmp_path / "run"
    train(train_cfg(data, run, max_steps=4, save_every=2, keep_last=2))
    nan_weights(run / "checkpoints" / "step_000004")
    train(train_cfg(data, run, max_steps=5, save_every=2, keep_last=1))
    assert steps(run) == ["corrupt-step_000004", "step_000005"]


def test_every_checkpoint_bad_is_one_error(tmp_path, data):
    from quark.train.loop import train

    run = tmp_path / "run"
    train(train_cfg(data, run, max_steps=2))
    flip_mantissa_bytes(run / "checkpoints" / "step_000002" / "model.safetensors", "model.norm.weight", n=2)
    with pytest.raises(ValueError, match=r"checkpoints: no checkpoint passes verification .*new --out folder"):
        train(train_cfg(data, run, max_steps=4))


def test_last_good_checkpoint_message_names_one_that_verifies(tmp_path, data, monkeypatch):
    """NaN loss at step 5, while the newest checkpoint (step 4) has meanwhile been damaged: step 2 is named."""
    from quark.model import Quark
    from quark.train.loop import train

    run = tmp_path / "run"
    real_loss, calls = Quark.loss, [0]

    def loss(self, *a, **kw):
        out = real_loss(self, *a, **kw)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 5:
                flip_mantissa_bytes(run / "checkpoints" / "step_000004" / "model.safetensors", "model.norm.weight")
                return out * float("nan")
        return out

    monkeypatch.setattr(Quark, "loss", loss)
    with pytest.raises(RuntimeError, match=r"loss is nan at step 5.*the last good checkpoint is \S+step_000002\. "):
        train(train_cfg(data, run, save_every=2, max_steps=10))


def test_nonfinite_weights_are_never_saved(tmp_path, data, monkeypatch):
    """An update that overflows the weights (finite loss and gradient) stops the run before its checkpoint."""
    from quark.train import loop

    real_build = loop.build_optimizer

    def build(model, *a, **kw):
        opt = real_build(model, *a, **kw)
        real_step, n = opt.step, [0]

        def step(*sa, **skw):
            out = real_step(*sa, **skw)
            n[0] += 1
            if n[0] == 4:
                with torch.no_grad():
                    model.model.norm.weight[3] = float("inf")
            return out
        opt.step = step
        return opt

    monkeypatch.setattr(loop, "build_optimizer", build)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"^step 4: tensor model.norm.weight holds non-finite values \(NaN/Inf\): "
                                           r"training diverged; not saving it; the last good checkpoint is "
                                           r"\S+step_000002\. Try a lower lr"):
        loop.train(train_cfg(data, run, save_every=2, max_steps=10))
    assert steps(run) == ["step_000002"]
    ckpt.verify_checkpoint(run / "checkpoints" / "step_000002")


def test_a_settings_mismatch_on_resume_stops_without_touching_checkpoints(tmp_path, data, monkeypatch):
    """Only integrity failures are skipped: an optimizer that no longer matches the saved one is an error."""
    from quark.train import loop

    run = tmp_path / "run"
    loop.train(train_cfg(data, run, max_steps=2))
    before = steps(run)
    monkeypatch.setattr(loop, "build_optimizer", lambda model, lr, *a, **k: torch.optim.AdamW(model.parameters(), lr))
    with pytest.raises(ValueError, match=r"step_000002: optimizer parameter groups do not match the model"):
        loop.train(train_cfg(data, run, max_steps=4))
    assert steps(run) == before == ["step_000002"]
    ckpt.verify_checkpoint(run / "checkpoints" / "step_000002")
