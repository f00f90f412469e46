"""Quark: train, fine-tune, evaluate and serve small self-hostable language models (Quark-72M)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import fast as _fast  # noqa: F401 -- registers the fast decoder with quark.generate
from .config import PRESETS, QuarkConfig
from .model import KVCache, Quark

if TYPE_CHECKING:
    from .llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "PRESETS", "KVCache", "Quark", "QuarkConfig", "__version__", "load"]


def load(path: str | Path, device: str = "auto", quantize: str | None = None) -> LLM:
    """A model ready to generate, chat and stream: `quark.load("runs/tiny/export/Quark-Tiny-Instruct")`. Any folder
    `quark` loads (run, checkpoint, HF export, Llama folder). See `quark.llm.LLM`."""
    from .llm import LLM

    return LLM.load(path, device=device, quantize=quantize)


def __getattr__(name: str):
    if name == "LLM":  # imported on first use: the engine is not needed to train
        from .llm import LLM

        return LLM
    raise AttributeError(f"module 'quark' has no attribute {name!r}")
