"""The offline corpora (`quark.data.offline`) as sources: real text comes out, instruction pairs are honest, math is repeatable."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quark.data import offline
from quark.data.mixture import mixture_from_dict


def _skip_without(kind, lang="en"):
    why = offline.unavailable(kind, lang)
    if why:
        pytest.skip(f"{kind} ({lang}) {why}")


@pytest.mark.corpora
def test_handbook_parallel_italian_and_english():
    _skip_without("handbook")
    en, it = list(offline.handbook_sections("en")), list(offline.handbook_sections("it"))
    assert len(en) > 300 and len(it) > 300
    it_text = " ".join(b for _, b in it)
    en_text = " ".join(b for _, b in en)
    assert it_text.count(" della ") > 200 > 10 * en_text.count(" della ")  # Italian prose (partly untranslated)
    assert not any(tag in t for t in (it_text, en_text) for tag in ("<div", "<span", "class=\"", "<a href"))
    assert any(t.startswith("Capitolo") for t, _ in it) and any(t.startswith("Chapter") for t, _ in en)
    with pytest.raises(ValueError, match="allowed: en, it"):
        list(offline.handbook_sections("fr"))


@pytest.mark.corpora
def test_fortunes_bible_chatterbot():
    _skip_without("fortunes", "it")
    it = list(offline.fortune_documents("it"))
    assert len(it) > 5000 and not any(q.strip() == "%" for q in it)
    convs = list(offline.chatterbot_conversations("it"))
    assert len(convs) > 500
    assert all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in convs)
    if offline.bible_program():
        chapters = list(offline.bible_documents())
        assert len(chapters) == 1189 and chapters[0].startswith("Genesis 1\n1 In the beginning God created")


def test_docstring_instructions_are_derived_from_real_functions():
    import ast

    pairs = []
    for conv in offline.docstring_instructions("en"):
        pairs.append(conv)
        if len(pairs) == 12:
            break
    for user, assistant in pairs:
        code = assistant["content"].removeprefix("```python\n").removesuffix("```")
        fn = ast.parse(code).body[0]
        assert isinstance(fn, ast.FunctionDef) and f"`{fn.name}(" in user["content"]
        assert ast.get_docstring(fn) is None  # the docstring is the request, not part of the answer
    it = next(offline.docstring_instructions("it"))
    assert it[0]["content"].startswith("Scrivi una funzione Python")


def test_math_generation_is_repeatable_across_processes():
    """Upstream draws from sets (string-hash and address order); our wrapping pins the output."""
    from quark.data.mathgen import generate_chunk, math_document

    code = "from quark.data.mathgen import math_document; print(repr(math_document(3, 5, 24)))"
    env = dict(os.environ, PYTHONHASHSEED=str(os.getpid() % 1000 + 7), OMP_NUM_THREADS="1")
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parent.parent).stdout.strip()
    doc = math_document(3, 5, 24)
    assert other == repr(doc)  # another process, another string-hash seed: the same text
    assert doc.count("Question: ") == 24 and doc.count("\nAnswer: ") == 24
    assert generate_chunk(3, 1, 8) != generate_chunk(3, 0, 8)


@pytest.mark.corpora
def test_sft_from_offline_sources(tmp_path, tiny_tokenizer):
    from quark.data.prepare import prepare

    mix = mixture_from_dict({"kind": "sft", "sources": [
        {"name": "chat-it", "type": "chatterbot", "lang": "it", "max_documents": 40},
        {"name": "hb-it", "type": "instructions", "kind": "handbook", "lang": "it", "max_documents": 10},
        {"name": "math", "type": "instructions", "kind": "math", "max_documents": 20}]})
    m = prepare(mix, tiny_tokenizer, tmp_path / "o", seq_len=256, progress=False, dedup=False, workers=1)
    docs = {s["name"]: s["documents"] for s in m["sources"]}
    if offline.unavailable("handbook", "it"):  # a fresh machine: the handbook source is dropped, naming its package
        assert docs == {"chat-it": 40, "math": 20}
        assert [(d["name"], d["reason"]) for d in mix.dropped] == [("hb-it", offline.unavailable("handbook", "it"))]
        assert "apt-get install debian-handbook" in mix.dropped[0]["reason"]
    else:
        assert docs == {"chat-it": 40, "hb-it": 10, "math": 20} and not mix.dropped
    assert m["splits"]["train"]["rows"] > 0 and m["splits"]["train"]["target_tokens"] > 0
    assert all(s["license"] for s in m["sources"])


def _add_or_sub_answers(question: str) -> set:
    """Every answer an add/subtract question can have: a + b, a - b, b - a, |a - b| of its two numbers."""
    import re
    from decimal import Decimal

    a, b = (Decimal(x) for x in re.findall(r"-?\d+(?:\.\d+)?", question))
    return {str(v.normalize()) if v != v.to_integral() else str(int(v)) for v in (a + b, a - b, b - a, abs(a - b))}


def test_targeted_math_source_asks_one_skill_repeatably():
    """`modules` + `difficulty` narrow generated math to a skill: SFT conversations and pre-training documents hold
    the same (question, answer) pairs, from `leveled_problems` at the mixture's seed + 7919, and every answer is a sum
    or difference of the question's two numbers (checked here with Decimal arithmetic, not the generator's)."""
    import itertools

    from quark.data.mathgen import generate_problems, leveled_problems
    from quark.data.sources import make_source

    spec = {"name": "arith", "modules": ["arithmetic__add_or_sub"], "difficulty": "easy"}
    chat = make_source({**spec, "type": "instructions", "kind": "math", "max_documents": 40})
    convs = list(chat.documents(seed=5))
    pairs = [(c[0]["content"], c[1]["content"]) for c in convs]
    assert len(pairs) == 40 and [c[0]["role"] for c in convs] == ["user"] * 40
    assert pairs == list(itertools.islice(leveled_problems(5 + 7919, ["arithmetic__add_or_sub"], "easy"), 40))
    assert pairs[:16] == generate_problems("arithmetic__add_or_sub", "easy", (5 + 7919) * 100_003, 16)
    assert all(a in _add_or_sub_answers(q) for q, a in pairs), pairs
    doc = next(make_source({**spec, "type": "math", "problems_per_doc": 4}).documents(seed=5))
    assert doc == "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in pairs[:4])[:-1]
    assert list(chat.documents(seed=5, start=38)) == convs[38:]


@pytest.mark.parametrize("extra, message", [
    ({"modules": ["arithmetic__nope"]}, "unknown math module(s) ['arithmetic__nope']; known: algebra__linear_1d,"),
    ({"modules": ["arithmetic__mul"], "difficulty": "trivial"}, "difficulty must be one of easy, medium, hard, got "
                                                                "'trivial'"),
    ({"modules": "arithmetic__mul"}, "modules must list mathematics_dataset module names"),
])
def test_targeted_math_source_errors(extra, message):
    from quark.data.sources import make_source

    with pytest.raises(ValueError, match="^mixture: source 'm': " + re.escape(message)):
        make_source({"name": "m", "type": "instructions", "kind": "math", **extra})
    with pytest.raises(ValueError, match="modules and difficulty apply to generated math only"):
        make_source({"name": "m", "type": "chatterbot", "modules": ["arithmetic__mul"]})
