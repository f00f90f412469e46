"""AdamW with weight decay on matrices only, and the learning-rate schedule (linear warmup, cosine to a floor).

Choices:
- Two parameter groups: every parameter with 2+ dims (embeddings, projections; the tied lm_head is the embedding)
  decays, 1-D ones (RMSNorm gains) do not, as in nanoGPT/Llama recipes.
- `fused=True` (one kernel for the whole update) on CUDA and on CPU, where it is ~6x faster than the foreach path
  (4 ms vs 26 ms per step for the tiny preset on one core).
- The schedule is a pure function of the step and the planned step count, so the scheduler's state is just
  those two numbers (saved in the checkpoint's JSON).
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # tied weights are yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=True)


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`: linear warmup to `lr` over
    `warmup_steps` (at most a third of the run), then cosine decay reaching `min_lr` at the last step."""
    warmup = min(warmup_steps, total_steps // 3)  # a run shorter than its warmup still gets to decay
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
