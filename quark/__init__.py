"""Quark: train, fine-tune, evaluate and serve small self-hostable language models (Quark-72M)."""

from .config import PRESETS, QuarkConfig
from .model import KVCache, Quark

__version__ = "0.1.0"
__all__ = ["PRESETS", "KVCache", "Quark", "QuarkConfig", "__version__"]
