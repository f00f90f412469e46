"""QuarkConfig: the one description of a Quark model's shape, plus named presets.

Choices:
- A plain dataclass, validated on construction, so a bad value fails at once naming the field.
- `vocab_size` counts embedding rows (quark-72m: its 65,536-token BPE plus the two ChatML control tokens). Which
  ids are special is the tokenizer's to say (quark/tokenizer.py), never derived from the config.
- `head_dim` defaults to d_model / n_heads (0 in a file means that); Llama-family models that set it otherwise
  keep theirs. `rope_scaling` is None or one of the RoPE frequency rules Llama checkpoints use ("linear",
  "llama3"), with HF's parameter names.
- Presets live in one registry (`PRESETS`); `from_name` and `from_dict` are the ways in (reading a file:
  quark/weights.py `config_from_file`, so this file stays torch- and package-free for the HF export),
  and `to_dict`/`save` write the `config.json` that sits beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

N_CHAT_TOKENS = 2  # <|im_start|>, <|im_end|> in Quark's own tokenizers
ROPE_SCALING_KEYS = {"linear": {"factor"},
                     "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


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
    head_dim: int = 0
    rope_scaling: dict | None = None

    def __post_init__(self):
        def need(ok: bool, field: str, msg: str):
            if not ok:
                raise ValueError(f"QuarkConfig.{field}={getattr(self, field)!r}: {msg}")

        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "context_length"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)
                 and getattr(self, name) > 0, name, "must be a positive integer")
        need(isinstance(self.head_dim, int) and self.head_dim >= 0, "head_dim", "must be 0 (d_model / n_heads) or > 0")
        if self.head_dim == 0:
            need(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model} (or set head_dim)")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, "n_heads", f"head_dim={self.head_dim} must be even for RoPE")
        need(self.vocab_size > 256, "vocab_size", "must exceed 256 (the byte alphabet)")
        need(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0, "rope_theta", "must be > 0")
        need(isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1, "norm_eps", "must be in (0, 1)")
        need(isinstance(self.tie_embeddings, bool), "tie_embeddings", "must be true or false")
        rs = self.rope_scaling
        kind = rs.get("rope_type") if isinstance(rs, dict) else None
        need(rs is None or kind in ROPE_SCALING_KEYS, "rope_scaling",
             f"must be null or an object with rope_type in {sorted(ROPE_SCALING_KEYS)}")
        if rs is not None:
            missing = ROPE_SCALING_KEYS[kind] - set(rs)
            need(not missing, "rope_scaling", f"rope_type {kind!r} needs {sorted(missing)}")
            need(all(isinstance(rs[k], (int, float)) and rs[k] > 0 for k in ROPE_SCALING_KEYS[kind]), "rope_scaling",
                 f"{sorted(ROPE_SCALING_KEYS[kind])} must be positive numbers")

    # derived sizes
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once), computed from the shapes alone."""
        d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * q * 2 + d * kv * 2
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
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of model settings, got {type(d).__name__}")
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
        """A copy with `kw` changed; a derived head_dim is derived again from a new d_model / n_heads."""
        if "head_dim" not in kw and self.head_dim * self.n_heads == self.d_model:
            kw["head_dim"] = 0
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
