"""torchrun DDP (gloo on CPU): 2 processes x 1 row x 2 accumulated micro-batches reach the same parameters as one
process with the whole global batch of 4 rows, on SFT rows whose loss masks differ in length (so the per-step
target count must be summed across processes and micro-batches for the gradients to agree)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from quark.config import QuarkConfig
from quark.model import Quark
from quark.train.config import TrainConfig
from quark.train.loop import train
from quark.weights import read_safetensors, save_model
from tests.test_train import ROOT, write_sft_data


def conversations(n=24, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        reply = " ".join(["ok"] * rng.randint(1, 12)) + f" {a + b}"
        out.append([{"role": "user", "content": f"{a} plus {b}?"}, {"role": "assistant", "content": reply}])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_vs_two_processes(tmp_path, common: dict) -> tuple[dict, dict, str]:
    """SFT `common` (3 steps) as one process with batch 4 and as `torchrun` 2 processes x batch 1 (so 2 accumulated
    micro-batches each): the step-3 weights of both, and the torchrun run's stdout."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(TrainConfig(out=str(one), batch_size=4, **common))  # accum 1
    sets = [f"--set={k}={json.dumps(v)}" for k, v in common.items() if k not in ("data", "base", "kind")]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={free_port()}", "-m", "quark", "sft", "--data", common["data"], "--from",
                        common["base"], "--out", str(two), "--set=batch_size=1", *sets],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    step = ("checkpoints", "step_000003", "model.safetensors")
    return read_safetensors(one.joinpath(*step)), read_safetensors(two.joinpath(*step)), r.stdout


@pytest.mark.slow  # torchrun starts two worker processes plus its agent (about 5 s of torch import each)
def test_two_processes_match_one_process(tmp_path, tiny_tokenizer):
    data = write_sft_data(tmp_path / "data", tiny_tokenizer, conversations(), seq_len=48)
    base = tmp_path / "base"
    save_model(Quark(QuarkConfig.from_name("test")).init_weights(1), base)
    tiny_tokenizer.save(base)
    common = dict(kind="sft", data=str(data), base=str(base), max_steps=3, warmup_steps=1, lr=3e-3,
                  log_every=1, eval_every=0, eval_batches=1, samples=0, tensorboard=False, plot=False,
                  tokens_per_step=4 * 48)
    a, b, stdout = one_vs_two_processes(tmp_path, common)
    assert "1 x 48 tokens x 2 process(es) x 2 accum" in stdout
    start = read_safetensors(base / "model.safetensors")
    assert max((a[k] - start[k]).abs().max() for k in a) > 1e-3  # training moved the weights
    for k in a:  # fp32 sums in another order: agreement to ~1e-7 seen, 1e-5 allowed
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
