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

An optional built-in corpus that this machine lacks (a Debian package not installed) is dropped, not fatal: the
mixture keeps the other sources, whose relative weights then share its weight in proportion, and
`Mixture.dropped` says what went and why (commands print it, manifests record it). Only when nothing is left for a
language the mixture asks for (all its English, Italian, code or math sources) does loading fail.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
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
    dropped: list[dict] = field(default_factory=list)  # {"name", "weight", "reason"} of unavailable sources

    @property
    def total_weight(self) -> float:
        return sum(s.weight for s in self.sources)

    def fingerprint(self) -> str:
        used = {"raw": self.raw, "dropped": sorted(d["name"] for d in self.dropped)} if self.dropped else self.raw
        return hashlib.sha256(json.dumps(used, sort_keys=True, default=str).encode()).hexdigest()

    def dropped_lines(self) -> list[str]:
        """One line per unavailable source, for the user: what is missing and where its weight went."""
        rest = len(self.sources)
        return [f"{d['name']}: {d['reason']}; its weight {d['weight']:g} goes to the other {rest} sources of "
                f"{self.name!r} in proportion" for d in self.dropped]


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
    sources, dropped = _drop_unavailable(sources, where)
    tokens = raw.get("tokens")
    if tokens is not None and (not isinstance(tokens, int) or tokens <= 0):
        raise ValueError(f"{where}: tokens must be a positive integer, got {tokens!r}")
    if kind == "pretrain":
        chat_only = [s.name for s in sources if s.options.get("chat")]
        if chat_only:
            raise ValueError(f"{where}: chat = true is for SFT mixtures (source(s) {', '.join(chat_only)})")
    return Mixture(name=Path(where).stem, kind=kind, sources=sources, tokens=tokens, raw=raw, dropped=dropped)


def _drop_unavailable(sources: list[Source], where: str) -> tuple[list[Source], list[dict]]:
    """The sources this machine can read, and a record of the others; fails when a language loses every source."""
    dropped = [{"name": s.name, "weight": s.weight, "reason": why, "language": s.language}
               for s in sources if (why := s.unavailable())]
    if not dropped:
        return sources, []
    gone = {d["name"] for d in dropped}
    kept = [s for s in sources if s.name not in gone]
    wanted = {s.language for s in sources if s.weight > 0 and s.language}
    left = {s.language for s in kept if s.weight > 0}
    for lang in sorted(wanted - left):
        why = "; ".join(f"{d['name']}: {d['reason']}" for d in dropped if d["language"] == lang)
        raise FileNotFoundError(f"{where}: nothing left for {_LANGS.get(lang, lang)} ({why})")
    return kept, dropped


_LANGS = {"en": "English", "it": "Italian", "code": "code", "math": "math"}
