"""Mixture files: which sources, with which weights, for pre-training or SFT.

A mixture is a TOML file:
    kind = "pretrain"            # or "sft"
    tokens = 6_000_000           # optional default budget (`quark prepare --tokens` overrides)
    [[sources]]
    name = "code"
    type = "python_stdlib"       # see quark.data.sources for the types and their keys
    weight = 45
Weights are relative (they need not sum to 1). Everything is validated before any data is read: an unknown
type, a missing file, a negative weight or a duplicate name fails at once, naming the source. Packaged mixtures
(`quark/mixtures/*.toml`) can be named without a path: `offline`, `quark-72m`, `sft`, `tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..textio import read_utf8
from .sources import Source, make_source

PACKAGED = Path(__file__).resolve().parent.parent / "mixtures"
KINDS = ("pretrain", "sft")


@dataclass
class Mixture:
    name: str
    kind: str
    sources: list[Source]
    tokens: int | None
    raw: dict

    @property
    def total_weight(self) -> float:
        return sum(s.weight for s in self.sources)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()


def packaged_mixtures() -> list[str]:
    return sorted(p.stem for p in PACKAGED.glob("*.toml"))


def resolve_mixture_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    packaged = PACKAGED / f"{name_or_path}.toml"
    if packaged.exists():
        return packaged
    raise FileNotFoundError(f"{name_or_path}: no such mixture file; packaged mixtures: {', '.join(packaged_mixtures())}")


def load_mixture(name_or_path: str | Path) -> Mixture:
    path = resolve_mixture_path(name_or_path)
    try:
        raw = tomllib.loads(read_utf8(path))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    return mixture_from_dict(raw, str(path))


def mixture_from_dict(raw: dict, where: str = "mixture") -> Mixture:
    kind = raw.get("kind", "pretrain")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    specs = raw.get("sources")
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{where}: no [[sources]] listed")
    sources = [make_source(s, where) for s in specs]
    names = [s.name for s in sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"{where}: duplicate source name(s): {', '.join(sorted(dup))}")
    if sum(s.weight for s in sources) <= 0:
        raise ValueError(f"{where}: the weights sum to 0; give at least one source a positive weight")
    tokens = raw.get("tokens")
    if tokens is not None and (not isinstance(tokens, int) or tokens <= 0):
        raise ValueError(f"{where}: tokens must be a positive integer, got {tokens!r}")
    if kind == "pretrain":
        chat_only = [s.name for s in sources if s.options.get("chat")]
        if chat_only:
            raise ValueError(f"{where}: chat = true is for SFT mixtures (source(s) {', '.join(chat_only)})")
    return Mixture(name=Path(where).stem, kind=kind, sources=sources, tokens=tokens, raw=raw)
