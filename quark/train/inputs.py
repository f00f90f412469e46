"""What a run starts from: the data folder, the tokenizer, the model shape and (SFT) the base weights, all checked
against each other before any training step, with errors that name the file and the disagreeing values.

Choices:
- The tokenizer is `tokenizer` from the config when given, else the data folder's own (`DATA/tokenizer.json`, or
  `DATA/tokenizer/`), else (SFT) the base model's own files (`quark.weights.load_tokenizer_for`: a folder, a run
  or a .gguf file). When the manifest records `tokenizer_sha256`, the tokenizer must hash to it: shards encoded
  with one tokenizer are meaningless under another.
- Vocabulary: every id of the tokenizer must have an embedding row (`vocab_size` >= the tokenizer's ids); a model
  in Quark's own layout (chat tokens as the last two ids) must match exactly, since its rows are those ids.
- Pre-training builds the model from a preset name or a `config.json`.
- SFT takes the architecture and weights from the base: any model Quark loads (a checkpoint, a run folder's
  newest checkpoint, an export, an imported or HF Llama folder, a llama .gguf file); a model of another
  architecture fails naming the field Quark cannot run.
- Loaders come from `quark.data.loader.make_loader`. With `pretrain_data` an SFT run also measures the pre-training
  validation loss at each evaluation (what SFT costs the base), and with `pretrain_mix` its train batches are a
  `MixedLoader`: round(pretrain_mix * batch_size) rows (at least 1) of pre-training windows of the SFT row length,
  every token a target, under the SFT rows, which are padded to that length (their padding masked out).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import QuarkConfig
from ..data.loader import make_loader, read_manifest
from ..tokenizer import Tokenizer
from ..weights import config_for, config_from_file, config_from_folder, load_tokenizer_for, resolve_model_path
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
    is_model = cands[0].is_file() and cands[0].suffix == ".gguf" or (cands[0] / "config.json").exists()
    tok = load_tokenizer_for(cands[0]) if is_model else Tokenizer.load(cands[0])
    want = manifest.get("tokenizer_sha256")
    if want and tok.sha256() != want:
        raise ValueError(f"{cands[0]}: tokenizer sha256 {tok.sha256()[:12]}... differs from the one the data in "
                         f"{cfg.data} was encoded with ({want[:12]}..., manifest.json tokenizer_sha256)")
    vocab = manifest.get("vocab_size")
    if vocab is not None and vocab not in (tok.vocab_size, tok.base_vocab_size):
        raise ValueError(f"{cfg.data}/manifest.json: vocab_size={vocab} but tokenizer {cands[0]} has "
                         f"{tok.vocab_size} ids")
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
        return config_for(path)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"base checkpoint {cfg.base} is not a Quark model: {e}") from None


def check_vocab(mc: QuarkConfig, tok: Tokenizer, where: str) -> None:
    if mc.vocab_size < tok.vocab_size or (tok.quark_layout and mc.vocab_size != tok.vocab_size):
        chat = f" ({tok.base_vocab_size} + 2 chat tokens)" if tok.quark_layout else ""
        need = "" if tok.quark_layout else " or more"
        raise ValueError(f"{where}: the model has vocab_size={mc.vocab_size} embedding rows but the tokenizer has "
                         f"{tok.vocab_size} ids{chat}; use a model config with vocab_size={tok.vocab_size}{need} or "
                         "the tokenizer the model was trained with")


class MixedLoader:
    """SFT rows and pre-training windows in every batch (see the module docstring); state = both loaders' states."""

    kind = "sft"

    def __init__(self, sft, pretrain):
        self.sft, self.pretrain = sft, pretrain
        self.seq_len, self.batch_size = sft.seq_len, sft.batch_size  # budgets count SFT rows

    def __len__(self) -> int:
        return len(self.sft)

    def next_batch(self):
        x, y, m = self.sft.next_batch()
        px, py, _ = self.pretrain.next_batch()
        pad = self.seq_len - x.shape[1]
        if pad:
            x, y = (torch.nn.functional.pad(t, (0, pad)) for t in (x, y))
            m = torch.nn.functional.pad(m, (0, pad), value=False)
        return torch.cat([x, px]), torch.cat([y, py]), torch.cat([m, torch.ones_like(py, dtype=torch.bool)])

    def state_dict(self) -> dict:
        return {"kind": "sft+pretrain", "sft": self.sft.state_dict(), "pretrain": self.pretrain.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sft+pretrain":
            raise ValueError("loader state does not match the data: the checkpoint was written without "
                             "pretrain_mix; resume with the same pretrain_mix, or use a new --out folder")
        self.sft.load_state_dict(state["sft"])
        self.pretrain.load_state_dict(state["pretrain"])


def _pretrain_manifest(cfg: TrainConfig, manifest: dict) -> dict:
    pre = read_manifest(cfg.pretrain_data)
    if pre["kind"] != "pretrain":
        raise ValueError(f"{cfg.pretrain_data}: pretrain_data needs a pre-training data folder (kind 'pretrain'), "
                         f"found kind {pre['kind']!r}")
    if pre.get("tokenizer_sha256") != manifest.get("tokenizer_sha256"):
        raise ValueError(f"{cfg.pretrain_data}: encoded with another tokenizer than {cfg.data} (manifest.json "
                         "tokenizer_sha256 differs)")
    return pre


def make_train_loaders(cfg: TrainConfig, manifest: dict, mc: QuarkConfig, rank: int = 0, world_size: int = 1):
    """(train loader, {metric name: val loader}, sequence length) of a run: "val_loss" reads the run's own val
    split; an SFT run with `pretrain_data` also reports "pretrain_val_loss" on that folder's val windows."""
    seq_len = cfg.seq_len or mc.context_length
    if cfg.kind == "pretrain" and seq_len > mc.context_length:
        raise ValueError(f"train config: seq_len={seq_len} exceeds the model's context_length={mc.context_length}")
    n_pre = max(1, round(cfg.pretrain_mix * cfg.batch_size)) if cfg.pretrain_mix else 0
    if n_pre >= cfg.batch_size:
        raise ValueError(f"train config: pretrain_mix={cfg.pretrain_mix} leaves no SFT row in a batch of "
                         f"batch_size={cfg.batch_size}; lower it or raise batch_size")

    def loader(split: str, batch: int):
        return make_loader(cfg.data, split, batch, seq_len, seed=cfg.seed, rank=rank, world_size=world_size,
                           manifest=manifest, vocab_size=mc.vocab_size)

    train = loader("train", cfg.batch_size - n_pre)
    seq_len = getattr(train, "seq_len", seq_len)
    if cfg.kind == "sft" and seq_len > mc.context_length:
        raise ValueError(f"{cfg.data}: SFT rows hold {seq_len} tokens, more than the base model's context_length="
                         f"{mc.context_length}; prepare them with `quark prepare --sft --seq-len {mc.context_length}`")
    pre_manifest = _pretrain_manifest(cfg, manifest) if cfg.kind == "sft" and cfg.pretrain_data else None
    if n_pre:
        train = MixedLoader(train, make_loader(cfg.pretrain_data, "train", n_pre, seq_len, seed=cfg.seed, rank=rank,
                                               world_size=world_size, manifest=pre_manifest,
                                               vocab_size=mc.vocab_size))
    vals = {"val_loss": loader("val", cfg.batch_size)} if manifest["splits"].get("val", {}).get("shards") else {}
    if pre_manifest is not None and pre_manifest["splits"].get("val", {}).get("shards"):
        vals["pretrain_val_loss"] = make_loader(cfg.pretrain_data, "val", cfg.batch_size, seq_len, seed=cfg.seed,
                                                rank=rank, world_size=world_size, manifest=pre_manifest,
                                                vocab_size=mc.vocab_size)
    return train, vals, seq_len
