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
    with pytest.raises(ValueError, match=r"base checkpoint .*gpt2 is not a Quark model: .*unknown field.*n_layer"):
        train(TrainConfig(base=str(gpt2), **cfg))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        train(TrainConfig(base=str(tmp_path / "nope"), **cfg))
    with pytest.raises(ValueError, match="sft needs a base checkpoint"):
        train(TrainConfig(**cfg))
