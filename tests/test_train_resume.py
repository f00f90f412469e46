"""Exact resume: a run SIGKILLed mid-way and resumed logs the same loss at every later step as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train import ROOT, write_pretrain_data

ARGS = ["--set", "model=test", "--set", "max_steps=30", "--set", "batch_size=8", "--set", "log_every=1",
        "--set", "warmup_steps=5", "--set", "eval_every=0", "--set", "eval_batches=1", "--set", "samples=0", "--set", "plot=false",
        "--set", "tensorboard=false", "--set", "keep_last=2"]


def cmd(data, out, *extra):
    return [sys.executable, "-m", "quark", "pretrain", "--data", str(data), "--out", str(out), *ARGS, *extra]


def losses(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["tokens"], r["lr"], r["grad_norm"]) for r in recs if "loss" in r}


@pytest.mark.slow  # three Python processes (about 5 s of torch import each) plus 60 training steps
def test_sigkill_then_resume_repeats_the_uninterrupted_losses(tmp_path, tiny_tokenizer):
    data = write_pretrain_data(tmp_path / "data", tiny_tokenizer, n_files=20)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    reference = subprocess.Popen(cmd(data, ref, "--set", "save_every=0"), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(cmd(data, cut, "--set", "save_every=4"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    metrics, deadline = cut / "metrics.jsonl", time.time() + 60
    while time.time() < deadline:  # kill once step 9 is logged: checkpoints 4 and 8 exist, step 30 is far
        if metrics.exists() and any(json.loads(x).get("step", 0) >= 9 for x in metrics.read_text().splitlines()
                                    if x.endswith("}")):
            break
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    before = losses(cut)
    assert 9 <= max(before) < 30, "the run must be killed mid-way"
    assert json.loads((cut / "run.json").read_text())["finished"] is None
    resumed = subprocess.run(cmd(data, cut, "--set", "save_every=4"), env=env, capture_output=True, text=True, check=False,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    want, got = losses(ref), losses(cut)
    assert sorted(got) == sorted(want) == list(range(1, 31))
    assert got == want  # bit-identical loss, tokens, lr and grad norm at every step
