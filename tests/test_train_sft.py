"""SFT: from a base checkpoint, on pre-tokenized ChatML rows with loss masks, the model learns to answer and to
end its replies with <|im_end|>; a base of another architecture is refused with a clear message."""

from __future__ import annotations

import json
import random
import re

import pytest

from quark.config import QuarkConfig
from quark.generate import generate
from quark.model import Quark
from quark.train.config import TrainConfig
from quark.train.loop import train
from quark.weights import load_model_and_tokenizer, save_model
from tests.test_train import write_sft_data

NAMES = ["Anna", "Marco", "Luca", "Sara", "Paolo", "Giulia", "Bob", "Alice"]


def conversations(n=64, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            out.append([{"role": "user", "content": f"What is {a} + {b}?"},
                        {"role": "assistant", "content": f"{a} + {b} = {a + b}."}])
        else:
            name = rng.choice(NAMES)
            out.append([{"role": "user", "content": f"Say hello to {name}."},
                        {"role": "assistant", "content": f"Hello, {name}!"}])
    return out


@pytest.fixture()
def base(tmp_path, tiny_tokenizer):
    folder = tmp_path / "base"
    save_model(Quark(QuarkConfig.from_name("test")).init_weights(0), folder)
    tiny_tokenizer.save(folder)
    return folder


def test_sft_learns_to_end_replies_with_im_end(tmp_path, tiny_tokenizer, base):
    tok = tiny_tokenizer
    data = write_sft_data(tmp_path / "data", tok, conversations(), seq_len=40)
    prompts = [tok.render_prompt([{"role": "user", "content": c}])
               for c in ("Say hello to Sara.", "What is 2 + 5?", "Say hello to Bob.")]
    before, _ = load_model_and_tokenizer(base)
    outs = generate(before, prompts, max_new_tokens=20, temperature=0, eos_token_id=tok.im_end_id)
    assert not any(o and o[-1] == tok.im_end_id for o in outs)  # an untrained model does not stop
    info = train(TrainConfig(kind="sft", data=str(data), base=str(base), out=str(tmp_path / "run"), batch_size=8,
                             max_steps=150, lr=3e-3, min_lr=1e-4, warmup_steps=10, log_every=50, eval_every=0,
                             eval_batches=1, samples=2, sample_tokens=12, tensorboard=False, plot=False))
    assert info["val_loss"] < 1.5 and info["base"] == str(base.resolve())
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["kind"] == "sft" and run["data_manifest"]["kind"] == "sft"
    model, _ = load_model_and_tokenizer(tmp_path / "run")
    outs = generate(model, prompts, max_new_tokens=20, temperature=0, eos_token_id=tok.im_end_id)
    texts = [tok.decode(o) for o in outs]
    assert all(o[-1] == tok.im_end_id for o in outs), texts  # every reply closes with <|im_end|>
    assert texts[0].startswith("Hello, ") and texts[0].endswith("!<|im_end|>"), texts  # the trained reply shape
    assert re.fullmatch(r"\d \+ \d = \d+\.<\|im_end\|>", texts[1]), texts


def test_sft_refuses_a_base_of_another_architecture(tmp_path, tiny_tokenizer):
    data = write_sft_data(tmp_path / "data", tiny_tokenizer, conversations(8), seq_len=40)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64}))
    tiny_tokenizer.save(gpt2)
    cfg = dict(kind="sft", data=str(data), out=str(tmp_path / "run"), max_steps=2)
    with pytest.raises(ValueError, match=r"base checkpoint .*gpt2 is not a Quark model: .*model_type='gpt2'.*not supported"):
        train(TrainConfig(base=str(gpt2), **cfg))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        train(TrainConfig(base=str(tmp_path / "nope"), **cfg))
    with pytest.raises(ValueError, match="sft needs a base checkpoint"):
        train(TrainConfig(**cfg))


def test_pretrain_mix_batches_hold_pretraining_windows_and_resume(tmp_path, tiny_tokenizer, base):
    """With pretrain_mix, each batch is the SFT loader's rows (padded, padding masked) over the pre-training loader's
    windows (every token a target), both as the plain loaders yield them; the loader state resumes exactly."""
    import torch

    from quark.data.loader import PretrainLoader, SFTLoader, read_manifest
    from quark.train.inputs import make_train_loaders
    from tests.test_train import write_pretrain_data

    tok = tiny_tokenizer
    data = write_sft_data(tmp_path / "data", tok, conversations(), seq_len=64)
    pre = write_pretrain_data(tmp_path / "pre", tok)
    cfg = TrainConfig(kind="sft", data=str(data), base=str(base), pretrain_data=str(pre), pretrain_mix=0.25,
                      batch_size=8, seed=3)
    mc = QuarkConfig.from_name("test")
    train_loader, vals, seq_len = make_train_loaders(cfg, read_manifest(data), mc)
    assert seq_len == 64 and set(vals) == {"val_loss", "pretrain_val_loss"}
    sft_ref, pre_ref = SFTLoader(data, "train", 6, seed=3), PretrainLoader(pre, "train", 64, 2, seed=3)
    for _ in range(3):
        x, y, m = train_loader.next_batch()
        sx, sy, sm = sft_ref.next_batch()
        px, py, _ = pre_ref.next_batch()
        w = sx.shape[1]
        assert x.shape == (8, 64) and w < 64  # short conversations: the SFT part is trimmed, then padded
        assert torch.equal(x[:6, :w], sx) and torch.equal(y[:6, :w], sy) and torch.equal(m[:6, :w], sm)
        assert not m[:6, w:].any()
        assert torch.equal(x[6:], px) and torch.equal(y[6:], py) and m[6:].all()
    state = train_loader.state_dict()
    again, _, _ = make_train_loaders(cfg, read_manifest(data), mc)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(train_loader.next_batch(), again.next_batch()))
    plain, _, _ = make_train_loaders(cfg.replace(pretrain_mix=0.0), read_manifest(data), mc)
    with pytest.raises(ValueError, match="written without pretrain_mix"):
        again.load_state_dict(plain.state_dict())


def test_pretrain_mix_config_errors(tmp_path, tiny_tokenizer, base):
    with pytest.raises(ValueError, match=r"pretrain_mix=0.5: needs pretrain_data"):
        TrainConfig(kind="sft", pretrain_mix=0.5)
    with pytest.raises(ValueError, match=r"pretrain_mix=1.0: must be in \[0, 1\)"):
        TrainConfig(kind="sft", pretrain_mix=1.0, pretrain_data="x")
    with pytest.raises(ValueError, match=r"pretrain_mix=0.2: applies to SFT runs only"):
        TrainConfig(kind="pretrain", pretrain_mix=0.2, pretrain_data="x")
    data = write_sft_data(tmp_path / "data", tiny_tokenizer, conversations(16), seq_len=40)
    cfg = dict(kind="sft", data=str(data), base=str(base), out=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(ValueError, match=r"data: pretrain_data needs a pre-training data folder \(kind 'pretrain'\)"):
        train(TrainConfig(pretrain_data=str(data), pretrain_mix=0.25, **cfg))
    with pytest.raises(ValueError, match=r"pretrain_mix=0.95 leaves no SFT row in a batch of batch_size=8"):
        train(TrainConfig(pretrain_data=str(data), pretrain_mix=0.95, batch_size=8, **cfg))


def test_pretrain_mix_keeps_the_pretraining_loss(tmp_path, tiny_tokenizer):
    """The point of pretrain_mix: the same SFT (a strong learning rate) raises the pre-training validation loss of a
    pre-trained base much less with a quarter of every batch from pre-training, and the run reports that loss."""
    from tests.test_train import write_pretrain_data

    tok = tiny_tokenizer
    pre = write_pretrain_data(tmp_path / "pre", tok)
    common = dict(batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, log_every=100, eval_every=0, eval_batches=4,
                  samples=0, tensorboard=False, plot=False)
    base_info = train(TrainConfig(kind="pretrain", model="test", data=str(pre), out=str(tmp_path / "base"),
                                  max_steps=120, seq_len=40, **common))
    data = write_sft_data(tmp_path / "data", tok, conversations(), seq_len=40)
    after = {}
    for mix in (0.0, 0.25):
        info = train(TrainConfig(kind="sft", data=str(data), base=str(tmp_path / "base"), out=str(tmp_path / f"s{mix}"),
                                 pretrain_data=str(pre), pretrain_mix=mix, max_steps=60, **common))
        after[mix] = info["pretrain_val_loss"]
        assert info["val_loss"] < 2.0  # the SFT task is learned either way
    print(f"pre-training val loss: base {base_info['val_loss']:.3f}, SFT {after[0.0]:.3f}, SFT+mix {after[0.25]:.3f}")
    assert after[0.25] - base_info["val_loss"] < 0.5 * (after[0.0] - base_info["val_loss"])
