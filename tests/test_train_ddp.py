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
from quark.train.config import TrainConfig, load_config
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
    # `quark sft` without --config runs the packaged `sft` config: the in-process run starts from the same file
    train(load_config("sft", out=str(one), batch_size=4, **common))  # accum 1
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


def losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


# slow: two torchrun agents (one per "node") and their two workers, ~5 s of torch import each
@pytest.mark.slow
def test_two_nodes_match_one_process_with_lora(tmp_path, tiny_tokenizer):
    """`torchrun --nnodes 2` as two launchers on this machine (c10d rendezvous on localhost, gloo), as on two
    machines: LoRA SFT with one row per node gives one process's losses and adapters with the same global batch."""
    data = write_sft_data(tmp_path / "data", tiny_tokenizer, conversations(), seq_len=48)
    base = tmp_path / "base"
    save_model(Quark(QuarkConfig.from_name("test")).init_weights(1), base)
    tiny_tokenizer.save(base)
    # lr 1e-4: Adam normalises lora_A's near-zero first gradients (B starts at 0), so fp32 summation-order noise
    # becomes a full-size step; a small lr keeps that within the tolerance (1e-2 gave 4e-4 loss differences)
    common = dict(max_steps=3, warmup_steps=1, lr=1e-4, min_lr=1e-5, log_every=1, eval_every=0, eval_batches=1, samples=0,
                  tensorboard=False, plot=False, lora_rank=4)
    train(TrainConfig(kind="sft", data=str(data), base=str(base), out=str(tmp_path / "one"), batch_size=2, **common))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    port = free_port()
    sets = [f"--set={k}={json.dumps(v)}" for k, v in common.items()]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", "--rdzv_id=quark-test",
                               "-m", "quark", "sft", "--data", str(data), "--from", str(base), "--out",
                               str(tmp_path / "two"), "--set=batch_size=1", *sets],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[1][-2000:] for o in outs)
    assert any("1 x 48 tokens x 2 process(es) x 1 accum" in o[0] for o in outs)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert all(abs(a - b) < 1e-5 for a, b in zip(one, two)), (one, two)
    step = ("checkpoints", "step_000003", "adapter.safetensors")
    a, b = read_safetensors((tmp_path / "one").joinpath(*step)), read_safetensors((tmp_path / "two").joinpath(*step))
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0  # the adapters trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
