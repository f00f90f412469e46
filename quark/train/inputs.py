"""What a run starts from: the data folder, the tokenizer, the model shape and (SFT) the base weights, all checked
against each other before any training step, with errors that name the file and the disagreeing values.

Choices:
- The tokenizer is `tokenizer` from the config when given, else the data folder's own (`DATA/tokenizer.json`, or
  `DATA/tokenizer/`), else (SFT) the base checkpoint's. When the manifest records `tokenizer_sha256`, the
  tokenizer must hash to it: shards encoded with one tokenizer are meaningless under another.
- Pre-training builds the model from a preset name or a `config.json`; its `vocab_size` (embedding rows, chat
  tokens included) must equal the tokenizer's.
- SFT takes the architecture and weights from the base (a checkpoint, an export or a run folder's newest
  checkpoint); a folder of another architecture fails naming the unknown fields or tensors.
"""

from __future__ import annotations

from pathlib import Path

from ..config import QuarkConfig
from ..data.loader import read_manifest
from ..tokenizer import Tokenizer
from ..weights import config_from_file, config_from_folder, resolve_model_path
from .config import TrainConfig


def load_data_manifest(cfg: TrainConfig) -> dict:
    if not cfg.data:
        raise ValueError("train config: no data folder; pass --data FOLDER (written by `quark prepare`) or set data")
    manifest = read_manifest(cfg.data)
    if manifest["kind"] != cfg.kind:
        raise ValueError(f"{cfg.data}: manifest kind is {manifest['kind']!r}, but `quark {cfg.kind}` needs a "
                         f"{cfg.kind!r} data folder (quark prepare --kind {cfg.kind})")
    return manifest


def _tokenizer_candidates(cfg: TrainConfig) -> list[Path]:
    if cfg.tokenizer:
        return [Path(cfg.tokenizer)]
    data = Path(cfg.data)
    found = [p for p in (data / "tokenizer.json", data / "tokenizer") if p.exists()]
    if cfg.kind == "sft" and cfg.base:
        found.append(resolve_model_path(cfg.base))
    return found


def load_tokenizer(cfg: TrainConfig, manifest: dict) -> Tokenizer:
    cands = _tokenizer_candidates(cfg)
    if not cands:
        raise FileNotFoundError(f"{cfg.data}: no tokenizer found (looked for tokenizer.json and tokenizer/ there); "
                                "pass --tokenizer PATH (the one given to `quark prepare`)")
    tok = Tokenizer.load(cands[0])
    want = manifest.get("tokenizer_sha256")
    if want and tok.sha256() != want:
        raise ValueError(f"{cands[0]}: tokenizer sha256 {tok.sha256()[:12]}... differs from the one the data in "
                         f"{cfg.data} was encoded with ({want[:12]}..., manifest.json tokenizer_sha256)")
    vocab = manifest.get("vocab_size")
    if vocab is not None and vocab not in (tok.vocab_size, tok.base_vocab_size):
        raise ValueError(f"{cfg.data}/manifest.json: vocab_size={vocab} but tokenizer {cands[0]} has "
                         f"{tok.base_vocab_size} (+2 chat tokens)")
    return tok


def model_config(cfg: TrainConfig) -> QuarkConfig:
    """Pre-training: the model shape from a preset name or a config.json path."""
    name = cfg.model
    if Path(name).suffix == ".json" or Path(name).is_dir():
        p = Path(name)
        return config_from_folder(p) if p.is_dir() else config_from_file(p)
    return QuarkConfig.from_name(name)


def base_model_path(cfg: TrainConfig) -> Path:
    if not cfg.base:
        raise ValueError("sft needs a base checkpoint: pass --from BASE (a checkpoint, export or run folder)")
    path = resolve_model_path(cfg.base)
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{cfg.base}: no config.json and no checkpoints/step_* inside; not a model folder")
    return path


def base_config(cfg: TrainConfig) -> QuarkConfig:
    path = base_model_path(cfg)
    try:
        return config_from_folder(path if path.is_dir() else path.parent)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"base checkpoint {cfg.base} is not a Quark model: {e}") from None


def check_vocab(mc: QuarkConfig, tok: Tokenizer, where: str) -> None:
    if mc.vocab_size != tok.vocab_size:
        raise ValueError(f"{where}: the model has vocab_size={mc.vocab_size} embedding rows but the tokenizer has "
                         f"{tok.vocab_size} ids ({tok.base_vocab_size} + 2 chat tokens); use a model config with "
                         f"vocab_size={tok.vocab_size} or the tokenizer the model was trained with")
