"""QuarkConfig: the one description of a Quark model's shape, plus named presets.

Choices:
- A plain dataclass, validated on construction, so a bad value fails at once naming the field.
- `vocab_size` counts embedding rows: the BPE base vocabulary plus the two ChatML control tokens
  (65,536 + 2 = 65,538 for quark-72m). `base_vocab_size` is derived.
- Presets live in one registry (`PRESETS`); `from_name` and `from_dict` are the ways in (reading a file:
  quark/weights.py `config_from_file`, so this file stays torch- and package-free for the HF export),
  and `to_dict`/`save` write the `config.json` that sits beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

N_CHAT_TOKENS = 2  # <|im_start|>, <|im_end|>


@dataclass(frozen=True)
class QuarkConfig:
    n_layers: int = 14
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: int = 2
    d_ff: int = 1344
    vocab_size: int = 65536 + N_CHAT_TOKENS
    context_length: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        def need(ok: bool, field: str, msg: str):
            if not ok:
                raise ValueError(f"QuarkConfig.{field}={getattr(self, field)!r}: {msg}")

        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "context_length"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)
                 and getattr(self, name) > 0, name, "must be a positive integer")
        need(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, "n_heads", f"head_dim={self.head_dim} must be even for RoPE")
        need(self.vocab_size > 256 + N_CHAT_TOKENS, "vocab_size", f"must exceed 256 bytes + {N_CHAT_TOKENS} chat tokens")
        need(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0, "rope_theta", "must be > 0")
        need(isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1, "norm_eps", "must be in (0, 1)")
        need(isinstance(self.tie_embeddings, bool), "tie_embeddings", "must be true or false")

    # derived sizes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def base_vocab_size(self) -> int:
        return self.vocab_size - N_CHAT_TOKENS

    @property
    def im_start_id(self) -> int:
        return self.base_vocab_size

    @property
    def im_end_id(self) -> int:
        return self.base_vocab_size + 1

    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once), computed from the shapes alone."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2
        mlp = 3 * d * self.d_ff
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        return self.n_layers * per_layer + d + emb * (1 if self.tie_embeddings else 2)

    def kv_cache_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """K and V for every layer, for one token (default bf16/fp16 elements)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_elem

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (6N for the matmuls plus attention), as in the PaLM/nanoGPT MFU estimate."""
        t = seq_len or self.context_length
        n = self.n_params() - self.vocab_size * self.d_model * (0 if self.tie_embeddings else 1)
        return 6 * n + 12 * self.n_layers * self.d_model * t

    # (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> QuarkConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> QuarkConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[name]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **kw) -> QuarkConfig:
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, QuarkConfig] = {
    # Quark-72M, the flagship (`quark info --preset quark-72m` prints its architecture).
    "quark-72m": QuarkConfig(),
    # CPU demo / speedrun default: same shape family, small enough to train in minutes on 2 cores.
    "tiny": QuarkConfig(n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, d_ff=688, vocab_size=8192 + 2,
                        context_length=256),
    # Unit tests: seconds per test.
    "test": QuarkConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512 + 2,
                        context_length=128),
}
