"""A stranger's first hour: the README's snippets run unattended in a real terminal, `quark.load` answers with the
tokens `quark chat` prints, the mixtures degrade without the Debian corpora, and the budget plan says what binds."""

import io
import re
import sys
from pathlib import Path

import pytest

from quark.config import PRESETS
from quark.data import offline
from quark.data.mixture import mixture_from_dict
from quark.model import Quark
from quark.weights import save_model

README = Path(__file__).resolve().parent.parent / "README.md"
EXPORT_IN_README = "runs/tiny/export/Quark-Tiny-Instruct"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    from quark.hf.export import export

    cfg = PRESETS["test"].replace(context_length=256, init_std=0.3)
    folder = tmp_path_factory.mktemp("first") / "ck"
    save_model(Quark(cfg).init_weights(seed=11).eval(), folder)
    tiny_tokenizer.save(folder)
    return export(folder, folder.parent / "Quark-Tiny-Instruct")


def _readme_block(marker: str) -> str:
    """The first ```python block of the README after the line containing `marker`."""
    text = README.read_text()
    start = text.index(marker)
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    return m.group(1)


def _run_in_terminal(tmp_path, code: str, timeout: int = 240) -> str:
    """Run `code` with a pseudo-terminal as stdin/stdout (as a person pasting it would): an interactive
    question such as transformers' "run the custom code? [y/N]" would wait here and fail the test."""
    pexpect = pytest.importorskip("pexpect", reason="pip install pexpect (extra quark[dev])")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    child = pexpect.spawn(sys.executable, [str(script)], cwd=str(tmp_path), timeout=timeout, encoding="utf-8",
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(README.parent), "OMP_WAIT_POLICY": "PASSIVE"})
    index = child.expect([r"\[y/N\]", pexpect.EOF])
    out = child.before + (child.after if isinstance(child.after, str) else "")
    child.close(force=True)
    assert index == 1, f"the snippet asked a question on the terminal:\n{out[-2000:]}"
    assert child.exitstatus == 0, out[-3000:]
    return out


def test_readme_transformers_snippet_runs_unattended_in_a_terminal(exported, tmp_path):
    code = _readme_block("**transformers**").replace(EXPORT_IN_README, str(exported))
    out = _run_in_terminal(tmp_path, code)
    assert "You are using a model of type" not in out and "custom code" not in out


def test_exported_card_quickstart_runs_unattended_in_a_terminal(exported, tmp_path):
    card = (exported / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace('"Quark-Tiny-Instruct"', f'"{exported}"')
    assert str(exported) in code  # the snippet loads the folder, not a Hub id
    out = _run_in_terminal(tmp_path, code)
    assert "You are using a model of type" not in out


def test_readme_python_api_snippet_runs(exported, tmp_path, monkeypatch, capsys):
    code = _readme_block("**Python**").replace(EXPORT_IN_README, str(exported))
    assert "quark.load(" in code
    exec(compile(code, "README Python API", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_load_chat_matches_quark_chat(exported, monkeypatch, capsys):
    import quark
    from quark.cli import main

    llm = quark.load(exported, device="cpu")
    assert llm.tokenizer.vocab_size == llm.model.config.vocab_size
    conv = [{"role": "user", "content": "Hello there"}]
    for seed in (3, 4):
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
        assert main(["chat", "--model", str(exported), "--seed", str(seed), "--max-new-tokens", "24"]) == 0
        printed = capsys.readouterr().out.split("quark> ", 1)[1]
        reply = llm.chat(conv, max_new_tokens=24, seed=seed)
        assert reply and printed.startswith(reply + "\n")
    # the same tokens as the reference decode loop with that seed (and the card's defaults)
    from quark.generate import generate
    from quark.sampling import RECOMMENDED

    ids = llm.tokenizer.render_prompt(conv)
    ref = generate(llm.model, [ids], 24, temperature=RECOMMENDED["temperature"], top_p=RECOMMENDED["top_p"],
                   rep_penalty=RECOMMENDED["rep_penalty"], eos_token_id=llm.tokenizer.im_end_id, seed=5)[0]
    ref = [t for t in ref if t not in (llm.tokenizer.im_end_id,)]
    if llm.tokenizer.eot_id in ref:
        ref = ref[:ref.index(llm.tokenizer.eot_id)]
    assert llm.chat(conv, max_new_tokens=24, seed=5) == llm.tokenizer.decode(ref)


def test_load_generate_batch_stream_and_errors(exported):
    import quark

    llm = quark.load(exported, device="cpu")
    prompts = ["def add(a, b):", "Ciao, come", "12 + 30 ="]
    batch = llm.generate(prompts, max_new_tokens=10, temperature=0)
    alone = [llm.generate(p, max_new_tokens=10, temperature=0) for p in prompts]
    assert batch == alone and all(isinstance(t, str) for t in batch)
    assert "".join(llm.stream(prompts[0], max_new_tokens=10, temperature=0)) == alone[0]
    convs = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Ciao"}]]
    assert llm.chat(convs, temperature=0, max_new_tokens=8) == [llm.chat(c, temperature=0, max_new_tokens=8)
                                                                 for c in convs]
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        llm.generate("x", top_p=0)
    with pytest.raises(TypeError, match="unknown sampling argument"):
        llm.generate("x", temp=1)
    with pytest.raises(FileNotFoundError):
        quark.load(exported.parent / "nope")
    assert isinstance(quark.LLM.load(exported.parent / "ck", device="cpu"), quark.LLM)  # a checkpoint folder too


def test_exported_tokenizer_max_length_is_the_models_context(exported):
    import json

    tc = json.loads((exported / "tokenizer_config.json").read_text())
    assert tc["model_max_length"] == 256


@pytest.mark.corpora
def test_mixture_drops_missing_corpora_and_reweights(monkeypatch, tmp_path):
    monkeypatch.setenv(offline.CORPUS_ROOT_ENV, str(tmp_path))
    raw = {"kind": "pretrain", "sources": [
        {"name": "code", "type": "python_stdlib", "weight": 6},
        {"name": "prose-en", "type": "handbook", "lang": "en", "weight": 3},
        {"name": "chat-en", "type": "chatterbot", "lang": "en", "weight": 1}]}
    m = mixture_from_dict(raw, "mix.toml")
    assert [s.name for s in m.sources] == ["code", "chat-en"]
    assert m.dropped_lines() == ["prose-en: not installed (apt-get install debian-handbook); its weight 3 goes to "
                                 "the other 2 sources of 'mix' in proportion"]
    assert m.total_weight == 7  # code 6/7, chat 1/7: the weights left share the missing one in proportion
    # the fingerprint changes with what was dropped, so data prepared with the corpus is not reused without it
    monkeypatch.setenv(offline.CORPUS_ROOT_ENV, str(tmp_path / "none"))
    (tmp_path / "none").mkdir()
    assert mixture_from_dict(raw, "mix.toml").fingerprint() == m.fingerprint()
    monkeypatch.delenv(offline.CORPUS_ROOT_ENV)
    if not offline.unavailable("handbook"):
        assert mixture_from_dict(raw, "mix.toml").fingerprint() != m.fingerprint()
    raw["sources"] = raw["sources"][:2]
    monkeypatch.setenv(offline.CORPUS_ROOT_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"mix.toml: nothing left for English \(prose-en: not installed"):
        mixture_from_dict(raw, "mix.toml")


def test_corpus_root_finds_a_handbook_there(monkeypatch, tmp_path):
    folder = tmp_path / "usr/share/doc/debian-handbook/html/it-IT"
    folder.mkdir(parents=True)
    body = "Questo è il testo della sezione, abbastanza lungo da essere tenuto come documento del manuale. " * 2
    (folder / "intro.html").write_text(f"<html><body><h2>Capitolo 1. Introduzione</h2><p>{body}</p></body></html>")
    monkeypatch.setenv(offline.CORPUS_ROOT_ENV, str(tmp_path))
    offline._handbook_sections.cache_clear()
    try:
        assert offline.unavailable("handbook", "it") is None and offline.unavailable("handbook", "en")
        assert list(offline.handbook_sections("it")) == [("Capitolo 1. Introduzione", body.strip())]
    finally:
        offline._handbook_sections.cache_clear()


def test_budget_plan_says_which_budget_binds():
    from quark.train.loop import budget_plan

    assert budget_plan({"max_steps=60": (60, ""), "epochs=1": (5, "1 epoch(s) of 40 rows")}) == (
        "5 steps = 1 epoch(s) of 40 rows (epochs=1 binds; max_steps=60 (60 steps) not reached)")
    assert budget_plan({"max_tokens=2048": (4, "2,048 tokens")}, max_minutes=3) == (
        "4 steps = 2,048 tokens (max_tokens=2048 binds; max_minutes=3 may stop it sooner)")
    assert budget_plan({}, 7) == "steps planned from max_minutes=7 after the first steps"


def test_prepare_sft_rows_default_to_the_models_context(exported, tmp_path, capsys):
    import json

    from quark.cli import main

    chats = tmp_path / "my.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                                                      {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                             for i in range(40)))
    assert main(["prepare", "--sft", str(chats), "--tokenizer", str(exported), "--out", str(tmp_path / "d"),
                 "--quiet"]) == 0
    assert f"rows of --seq-len 256 tokens (the context of the model in {exported})" in capsys.readouterr().err
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["seq_len"] == 256
