"""TrainConfig: every knob of a pre-training or SFT run, read from a TOML file and `--set key=value` overrides.

Choices:
- One flat frozen dataclass shared by `quark pretrain` and `quark sft`; the packaged files in `quark/configs/`
  (`pretrain-tiny`, `sft-tiny`, `pretrain-quark-72m`, `sft-quark-72m`) are named without their `.toml`.
- Unknown keys and wrong types fail before anything is loaded, naming the key, the file and the expected type.
- A `--set` value is parsed as a TOML value (`lr=3e-4`, `compile=false`, `model="tiny"`); a bare word that is not
  valid TOML is taken as a string (`model=tiny`). Ints are accepted where floats are expected.
- SFT forgets pre-training quickly (the tiny speedrun's validation loss rose 1.2 nats/token in 3 minutes of SFT):
  `pretrain_mix` > 0 makes that share of every micro-batch's rows pre-training windows of `pretrain_data` (every
  token a target), so the SFT run keeps practising its pre-training distribution; `epochs` still counts SFT rows.
  On the tiny speedrun's base, 250 SFT steps raised the full pre-training val loss by 0.69 nats/token without it
  and by 0.003 with pretrain_mix = 0.25, at a 0.11 higher SFT val loss (dev/LOG.md, 2026-12-02 issue 23).
- LoRA (`lora_rank` > 0, SFT only): the base is frozen and `quark.lora` adapters of that rank train on the
  `lora_targets` matrices (default: all seven of attention and MLP), scaled by lora_alpha / lora_rank (lora_alpha
  0: twice the rank, a common choice that keeps the update's size as the rank changes); the checkpoints hold only
  the adapters. AdamW only: Muon orthogonalises whole matrices, which a rank-r factor is not.
- Budgets: a run stops at the first of `max_steps`, `max_tokens`, `epochs` (SFT) and `max_minutes`; at least one
  must be set. The cosine schedule spans the planned steps; a time-bounded run plans its step count from the
  speed of its first steps and stores the plan in its checkpoints, so a resumed run follows the same schedule.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from ..lora import LORA_TARGETS, check_targets
from ..textio import read_utf8

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "pretrain"          # "pretrain" or "sft"
    model: str = "tiny"             # pretrain: a preset name or a config.json path (SFT takes the base's)
    data: str = ""                  # data folder written by `quark prepare`
    out: str = ""                   # run folder (resumed when it already holds checkpoints)
    base: str = ""                  # SFT: the base checkpoint / run folder
    tokenizer: str = ""             # tokenizer folder/file; default: the data folder's, else the base's
    seed: int = 1337
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    precision: str = "auto"         # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: str = "auto"           # auto (on CUDA) | true | false
    batch_size: int = 16            # rows per micro-batch per process
    seq_len: int = 0                # pretrain window length; 0 = the model's context_length
    tokens_per_step: int = 0        # global tokens per optimizer step (grad accumulation); 0 = one micro-batch
    max_steps: int = 0
    max_tokens: int = 0
    max_minutes: float = 0.0
    epochs: float = 0.0             # SFT: passes over the train rows
    pretrain_data: str = ""         # SFT: a pre-training data folder: its val loss (first eval_batches windows)
                                    # is logged as pretrain_val_loss; with pretrain_mix > 0 its windows mixed in
    pretrain_mix: float = 0.0       # SFT: share of each micro-batch's rows that are pre-training windows (< 1)
    lora_rank: int = 0              # SFT: > 0 trains LoRA adapters of this rank, the base frozen (0: full SFT)
    lora_alpha: float = 0.0         # LoRA scale = lora_alpha / lora_rank; 0: 2 * lora_rank
    lora_dropout: float = 0.0       # dropout on the adapters' input (PEFT's lora_dropout)
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))
    optimizer: str = "adamw"        # adamw | muon (Muon on hidden matrices, AdamW on the rest; quark/train/optim.py)
    lr: float = 3e-3
    min_lr: float = 3e-4            # the cosine floor
    muon_lr: float = 0.0            # optimizer=muon: Muon's peak lr (AdamW-matched scale); 0 = lr
    warmup_steps: int = 100
    weight_decay: float = 0.1       # matrices only (embeddings, projections); norms never decay
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0          # 0 disables clipping (the norm is still measured)
    log_every: int = 10
    eval_every: int = 200           # 0: only at the end
    eval_batches: int = 20          # micro-batches of validation per process
    save_every: int = 500           # 0: only at the end
    keep_last: int = 3
    samples: int = 3                # generated samples printed at each validation
    sample_tokens: int = 48
    sample_prompts: list[str] = dataclasses.field(default_factory=list)
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self):
        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ValueError(f"train config: {key}={getattr(self, key)!r}: {msg}")

        need(self.kind in ("pretrain", "sft"), "kind", "allowed: 'pretrain', 'sft'")
        need(self.precision in ("auto", "bf16", "fp32"), "precision", "allowed: 'auto', 'bf16', 'fp32'")
        need(self.compile in ("auto", "true", "false"), "compile", "allowed: 'auto', 'true', 'false'")
        need(self.optimizer in ("adamw", "muon"), "optimizer", "allowed: 'adamw', 'muon'")
        need(self.muon_lr >= 0, "muon_lr", "must be >= 0 (0: the same as lr)")
        for key in ("batch_size", "log_every", "keep_last"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("seq_len", "tokens_per_step", "max_steps", "max_tokens", "max_minutes", "epochs", "warmup_steps",
                    "weight_decay", "grad_clip", "eval_every", "eval_batches", "save_every", "samples",
                    "sample_tokens", "min_lr"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        need(0 <= self.pretrain_mix < 1, "pretrain_mix", "must be in [0, 1)")
        need(not self.pretrain_mix or self.kind == "sft", "pretrain_mix", "applies to SFT runs only")
        need(not self.pretrain_mix or bool(self.pretrain_data), "pretrain_mix",
             "needs pretrain_data, the pre-training data folder (`quark prepare --mixture ...`) to mix in")
        need(self.lora_rank >= 0, "lora_rank", "must be >= 0 (0: full fine-tuning)")
        need(not self.lora_rank or self.kind == "sft", "lora_rank", "applies to SFT runs only (quark sft)")
        need(not self.lora_rank or self.optimizer == "adamw", "lora_rank",
             f"trains with optimizer='adamw' only (optimizer={self.optimizer!r})")
        need(self.lora_alpha >= 0, "lora_alpha", "must be >= 0 (0: 2 * lora_rank)")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        check_targets(self.lora_targets, "train config: lora_targets")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.min_lr <= self.lr, "min_lr", f"must be <= lr={self.lr}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "beta1 and beta2 must be in [0, 1)")

    @property
    def lora(self) -> dict | None:
        """rank, alpha, dropout and targets of a LoRA run (None: full fine-tuning)."""
        if not self.lora_rank:
            return None
        return {"rank": self.lora_rank, "alpha": self.lora_alpha or 2.0 * self.lora_rank,
                "dropout": self.lora_dropout, "targets": list(check_targets(self.lora_targets))}

    def check_budget(self) -> None:
        if not (self.max_steps or self.max_tokens or self.max_minutes or self.epochs):
            raise ValueError("train config: no budget; set at least one of max_steps, max_tokens, max_minutes, epochs")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)


def _types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _check_type(key: str, value, expected, source: str):
    """The value converted to the field's type, or a ValueError naming key, source and expected type."""
    origin = typing.get_origin(expected)
    if origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        want = "a list of strings"
    elif expected is bool:
        if isinstance(value, bool):
            return value
        want = "true or false"
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        want = "an integer"
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        want = "a number"
    else:  # str
        if isinstance(value, bool) and key == "compile":
            return "true" if value else "false"
        if isinstance(value, str):
            return value
        want = "a string"
    raise ValueError(f"{source}: key {key!r} must be {want}, got {value!r} ({type(value).__name__})")


def from_dict(d: dict, source: str = "config", base: TrainConfig | None = None) -> TrainConfig:
    kinds = _types()
    unknown = sorted(set(d) - set(kinds))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; allowed: {', '.join(sorted(kinds))}")
    values = {k: _check_type(k, v, kinds[k], source) for k, v in d.items()}
    return dataclasses.replace(base or TrainConfig(), **values)


def resolve_config_path(name: str | Path) -> Path:
    """A TOML path, or a packaged config by name (`pretrain-tiny` -> quark/configs/pretrain-tiny.toml)."""
    p = Path(name)
    if p.exists():
        return p
    packaged = CONFIG_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if packaged.exists() and p.parent == Path("."):
        return packaged
    known = sorted(f.stem for f in CONFIG_DIR.glob("*.toml"))
    raise FileNotFoundError(f"{name}: train config not found (a .toml file, or one of the packaged configs: "
                            f"{', '.join(known)})")


def parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key, value


def load_config(path: str | Path | None, overrides: list[str] | tuple = (), **fixed) -> TrainConfig:
    """TrainConfig from a TOML file (or defaults when path is None), then `fixed` keyword values (from CLI flags),
    then `key=value` overrides; every key and type is checked before anything runs."""
    cfg = TrainConfig()
    if path is not None:
        p = resolve_config_path(path)
        try:
            d = tomllib.loads(read_utf8(p))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: not valid TOML ({e})") from None
        cfg = from_dict(d, source=str(p))
    fixed = {k: v for k, v in fixed.items() if v is not None}
    if fixed:
        cfg = from_dict(fixed, source="command line", base=cfg)
    if overrides:
        cfg = from_dict(dict(parse_override(o) for o in overrides), source="--set", base=cfg)
    return cfg


__all__ = ["CONFIG_DIR", "TrainConfig", "from_dict", "load_config", "parse_override", "resolve_config_path"]
