"""LoRA: low-rank adapters on a model's linear layers, trained with the base frozen, merged for inference.

Choices:
- `LoRALinear` wraps the model's own `nn.Linear` (`base_layer`, frozen) with `lora_A` (rank x in) and `lora_B`
  (out x rank): y = base_layer(x) + (alpha / rank) * lora_B(lora_A(dropout(x))). These are PEFT's formula and
  parameter names, so an adapter's path here (`model.layers.0.self_attn.q_proj.lora_A.weight`) is its PEFT name
  less the `base_model.model.` prefix. The low-rank product is never formed while training: the backward pass
  computes no gradient of the base matrices, which is what makes LoRA cheaper than full SFT in time and memory.
- Init as PEFT: A kaiming-uniform (a = sqrt(5)) from a seeded generator, B zeros, so step 0 is the base exactly.
- `weight` is the merged matrix (W + scale * B @ A, no gradient): code that reads a linear layer's weight (a
  decoder building fused copies, a quantizer) sees what the layer computes now. `merge_lora` replaces each
  LoRALinear by a plain nn.Linear holding that matrix: inference and every export load merged models.
- This file imports only torch (the model's own modules); saving and loading adapter folders is quark.weights'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class LoRALinear(nn.Module):
    """`base_layer(x) + scale * lora_B(lora_A(dropout(x)))`, the base layer frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
        with torch.no_grad():
            a = torch.rand(self.lora_A.weight.shape, generator=generator, dtype=torch.float32) * 2 - 1
            self.lora_A.weight.copy_(a * bound)
            self.lora_B.weight.zero_()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The merged (out, in) matrix this layer computes with (dropout aside)."""
        with torch.no_grad():
            w = self.base_layer.weight
            return w + (self.lora_B.weight.float() @ self.lora_A.weight.float()).to(w.dtype) * self.scale


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def check_targets(targets: Sequence[str], where: str = "lora_targets") -> tuple[str, ...]:
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise ValueError(f"{where}={list(targets)!r}: allowed names (one or more): {', '.join(LORA_TARGETS)}")
    return tuple(dict.fromkeys(targets))


def apply_lora(model: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0,
               targets: Sequence[str] = LORA_TARGETS, seed: int = 0) -> nn.Module:
    """Freeze every parameter of `model` and wrap each target linear (by attribute name: q_proj, ..., down_proj)
    in a LoRALinear; in place, returns model. A model that already has adapters is refused."""
    if rank < 1:
        raise ValueError(f"lora_rank={rank}: must be >= 1")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge them first (quark.lora.merge_lora)")
    targets = check_targets(targets)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout, g))
    if not has_lora(model):
        raise ValueError(f"lora_targets={list(targets)}: no linear layer of the model has these names")
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only: `<layer path>.lora_A.weight` and `.lora_B.weight`."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith(ADAPTER_SUFFIXES)}


def load_lora_state(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors into a model with the same adapters; names and shapes are checked first."""
    want = lora_state_dict(model)
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise ValueError(f"{source}: adapters do not match the model's LoRA layers (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); resume with the same lora_rank and lora_targets")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, the model's adapter has "
                             f"{tuple(v.shape)} (another lora_rank?)")
    with torch.no_grad():
        for k, v in want.items():
            v.copy_(sd[k])


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by a plain nn.Linear holding its merged weight; in place, returns model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = child.base_layer
                plain.weight.copy_(child.weight)
                setattr(parent, name, plain)
    return model


def adapter_params(model: nn.Module) -> int:
    return sum(v.numel() for v in lora_state_dict(model).values())


__all__ = ["ADAPTER_SUFFIXES", "LORA_TARGETS", "LoRALinear", "adapter_params", "apply_lora", "check_targets",
           "has_lora", "load_lora_state", "lora_layers", "lora_state_dict", "merge_lora"]
