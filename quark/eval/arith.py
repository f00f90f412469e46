"""The `arith` task's items: held-out arithmetic questions from the generators our math training data uses.

Choices:
- Questions come from `quark.data.mathgen.generate_problems`: DeepMind mathematics_dataset's nine `arithmetic__*`
  modules (add_or_sub, add_sub_multiple, mul, div, mixed, ...), each at three difficulties (upstream's
  train-easy / -medium / -hard thirds of the training entropy range). Training draws from the same modules over the
  whole range with small seeds (the mixture's `seed` + 1000 * epoch, + 7919 for math instructions); the eval seed
  `ARITH_SEED` is far from those, and the module set is generated per (module, difficulty), a stream training
  never samples.
- A same-generator question can still occur in training by chance (easy questions come from a small space), so
  `dedup_against` drops every question that appears in the training shards: the shards are decoded and every line
  is indexed (with a leading "Question: " and ChatML markers removed), which covers both pre-training math
  documents ("Question: q\\nAnswer: a") and SFT conversations (the user turn is q).
- Generation runs in one spawned worker with PYTHONHASHSEED=0 (`math_pool`), so the items are the same on every
  run and machine; they are cached per process.
- Scoring is exact match of the stripped first line of the answer against the generator's answer string.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

ARITH_SEED = 2_027_011_301
ARITH_MODULES = ("add_or_sub", "add_sub_multiple", "mul", "div", "mixed", "mul_div_multiple", "add_or_sub_in_base",
                 "nearest_integer_root", "simplify_surd")
DEFAULT_PER_GROUP = 50


def _generate_all(per_group: int) -> list[tuple[str, str, str, str]]:
    from ..data.mathgen import DIFFICULTIES, generate_problems

    return [(m, d, q, a) for d in DIFFICULTIES for m in ARITH_MODULES
            for q, a in generate_problems(f"arithmetic__{m}", d, ARITH_SEED, per_group)]


@lru_cache(maxsize=4)
def arith_problems(per_group: int = DEFAULT_PER_GROUP) -> tuple[tuple[str, str, str, str], ...]:
    """(module, difficulty, question, answer) for every module x difficulty, `per_group` each, deterministic."""
    from ..data.mathgen import math_pool

    with math_pool(1) as pool:
        return tuple(tuple(r) for r in pool.apply(_generate_all, (per_group,)))


def _norm_line(line: str) -> str:
    line = line.strip().removeprefix("<|im_start|>user").removesuffix("<|im_end|>").strip()
    return line.removeprefix("Question:").strip()


def shard_lines(data_dir: str | Path, tokenizer, chunk: int = 1 << 20) -> set[str]:
    """Every normalised line of text in a data folder's train and val shards (decoded with `tokenizer`)."""
    from ..data.loader import read_manifest

    folder = Path(data_dir)
    manifest = read_manifest(folder)
    lines: set[str] = set()
    for split, info in manifest["splits"].items():
        for name in info.get("shards", []):
            arr = np.load(folder / split / name, mmap_mode="r", allow_pickle=False)
            flat = arr.reshape(-1)
            tail = ""
            for i in range(0, len(flat), chunk):
                text = tail + tokenizer.decode(flat[i:i + chunk].tolist())
                parts = text.split("\n")
                tail = parts.pop()
                lines.update(_norm_line(p) for p in parts)
            lines.add(_norm_line(tail))
    return lines


def dedup_against(problems: Sequence[tuple], seen_lines: set[str]) -> tuple[list[tuple], int]:
    """(problems whose question is not a training line, number removed)."""
    kept = [p for p in problems if p[2].strip() not in seen_lines]
    return kept, len(problems) - len(kept)


def run_record(model_folder: str | Path) -> dict:
    """What the training run of a checkpoint says about it: {"kind", "data", "base"} (empty for an export)."""
    import json

    folder = Path(model_folder)
    for path in (folder.parent.parent / "run.json", folder / "train_state.json"):
        if path.exists():
            try:
                d = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            d = d if "data" in d and path.name == "run.json" else d.get("train_config", {})
            return {k: d.get(k) for k in ("kind", "data", "base")}
    return {}


def training_data_dirs(model_folder: str | Path) -> list[Path]:
    """The data folders a checkpoint was trained on: its run's, and its SFT base's (recorded by the training run)."""
    from ..weights import resolve_model_path

    out, folder = [], Path(model_folder)
    for _ in range(4):  # SFT -> base -> (a base of a base, if one ever exists)
        rec = run_record(folder)
        if rec.get("data"):
            out.append(Path(rec["data"]))
        if not rec.get("base"):
            break
        try:
            folder = resolve_model_path(rec["base"])
        except FileNotFoundError:
            break
    return [p for p in out if p.exists()]
