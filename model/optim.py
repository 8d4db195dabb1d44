"""The optimizer of both training stages (train: the RPT model; reference: a GPT-NeoX): AdamW with weight
decay on the weight matrices only. Its learning rate is set every step from `model.schedules.learning_rate`
(`set_lr`), a pure function of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

from typing import Any

import torch


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay on matrices; not on vectors (norms, biases) nor on CCA's learned null key/value
    (`null_k`, `null_v`: matrices by shape, biases by role)."""
    return p.dim() >= 2 and "null_" not in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(
    model: torch.nn.Module,
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW (eps 1e-8) over `param_groups`. `fused`: torch's fused CUDA kernel (the train stage's on a
    GPU); None: torch's default implementation."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8, fused=fused)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
