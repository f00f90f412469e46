"""The terminal chat, driven through stdin: replies checked against `quark.generate` on the rendered ChatML
conversation, the commands, and trimming at the context limit."""

import io
import sys

import pytest

from quark.config import QuarkConfig
from quark.generate import generate
from quark.llm import LLM
from quark.serve.chat import ChatSession, run_chat, set_params
from quark.serve.engine import SamplingParams
from quark.weights import save_model

from .test_serve_engine import contextual

CFG = QuarkConfig.from_name("test")
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, top_p=0.9, rep_penalty=1.15)


@pytest.fixture(scope="module")
def model():
    return contextual(3)  # replies that depend on the conversation


def reference_reply(model, tok, messages, params):
    ids = generate(model, [tok.render_prompt(messages)], params.max_new_tokens, temperature=0.0,
                   rep_penalty=params.rep_penalty, eos_token_id=tok.im_end_id)[0]
    if tok.eot_id in ids:
        ids = ids[:ids.index(tok.eot_id)]
    return tok.decode([t for t in ids if t != tok.im_end_id])


def chat(model, tok, lines, params=GREEDY, system=None):
    out = io.StringIO()
    run_chat(LLM(model, tok), params, system=system, stdin=io.StringIO("".join(x + "\n" for x in lines)), stdout=out)
    return out.getvalue()


def replies(output):
    """The text after each 'quark> ' up to the end of that line."""
    return [chunk.split("\n", 1)[0] for chunk in output.split("quark> ")[1:]]


def test_multi_turn_replies_match_generate(model, tiny_tokenizer):
    tok = tiny_tokenizer
    out = chat(model, tok, ["Hello there", "And a second question?"], system="Be brief.")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = reference_reply(model, tok, conv, GREEDY)
    conv += [{"role": "assistant", "content": first}, {"role": "user", "content": "And a second question?"}]
    second = reference_reply(model, tok, conv, GREEDY)
    assert f"quark> {first}\n" in out and f"quark> {second}\n" in out
    assert "<|im_end|>" not in out


def test_commands(model, tiny_tokenizer):
    out = chat(model, tiny_tokenizer, ["/params", "/params temperature=0.5 max_new_tokens=3 seed=4", "/params top_p=2",
                                       "/params nonsense=1", "/system You are terse.", "/system", "hi", "/reset",
                                       "/system -", "/help", "/bogus", "/quit", "never read"])
    assert "temperature=0.0 top_p=0.9 rep_penalty=1.15 max_new_tokens=12" in out
    assert "temperature=0.5 top_p=0.9 rep_penalty=1.15 max_new_tokens=3 seed=4" in out
    assert "[error: top_p must be in (0, 1]" in out and "[error: expected key=value" in out
    assert "[system prompt set]" in out and "[system prompt: 'You are terse.']" in out
    assert "[conversation cleared]" in out and "[system prompt removed]" in out
    assert "/reset" in out and "[unknown command /bogus" in out
    assert len(replies(out)) == 1


def test_reset_forgets_the_conversation(model, tiny_tokenizer):
    a = chat(model, tiny_tokenizer, ["first", "/reset", "Hello there"])
    b = chat(model, tiny_tokenizer, ["Hello there"])
    assert replies(a)[1:] == replies(b)


def test_trims_oldest_turns_and_says_so(model, tiny_tokenizer):
    long = "a fairly long message about the weather " * 2
    params = SamplingParams(max_new_tokens=20, temperature=0.0, top_p=0.9, rep_penalty=1.15)
    out = chat(model, tiny_tokenizer, [long, long, long, long], params=params)
    assert "oldest turn(s) to fit the 128-token context]" in out
    assert len(replies(out)) == 4
    huge = chat(model, tiny_tokenizer, ["word " * 200], params=params)
    assert "[error: this message is too long" in huge


def test_session_trimming_keeps_system_and_fits(tiny_tokenizer):
    s = ChatSession(tiny_tokenizer, 128, system="sys")
    for i in range(12):
        s.add_turn(f"question {i}", f"answer {i}")
    ids, trimmed, max_new = s.prompt_for("new question", 40)
    assert 0 < trimmed < 12 and len(ids) + max_new <= 128 and max_new == 40
    assert s.history[0]["content"] == f"question {trimmed}"  # the oldest went first
    assert s.messages()[0] == {"role": "system", "content": "sys"} and s.messages()[1]["role"] == "user"
    assert ids == tiny_tokenizer.render_prompt(s.messages([{"role": "user", "content": "new question"}]))


def test_set_params_validates():
    p = set_params(GREEDY, ["rep_penalty=1.3", "seed=none"])
    assert p.rep_penalty == 1.3 and p.seed is None
    for bad in (["temperature=-1"], ["max_new_tokens=0"], ["top_p=abc"], ["temperature"]):
        with pytest.raises(ValueError):
            set_params(GREEDY, bad)


def test_quark_chat_command(tmp_path, model, tiny_tokenizer, monkeypatch, capsys):
    from quark.cli import main

    folder = tmp_path / "m"
    save_model(model, folder)
    tiny_tokenizer.save(folder)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
    rc = main(["chat", "--model", str(folder), "--temperature", "0", "--max-new-tokens", "12", "--system", "Be brief."])
    assert rc == 0
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert f"quark> {reference_reply(model, tiny_tokenizer, conv, GREEDY)}\n" in capsys.readouterr().out


def test_chat_command_errors(tmp_path, model, tiny_tokenizer, capsys):
    from quark.cli import main
    from quark.weights import load_for_inference

    folder = tmp_path / "m"
    save_model(model, folder)
    tiny_tokenizer.save(folder)
    assert main(["chat", "--model", str(folder), "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "nope")]) == 2
    try:  # int8 works when quark.quantize exists, else a clear error says what is missing
        m, _ = load_for_inference(str(folder), "cpu", "int8")
        assert not m.training
    except RuntimeError as e:
        assert "quark.quantize.quantize_int8" in str(e)
