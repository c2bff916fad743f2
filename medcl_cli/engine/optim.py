"""Optimizer and learning-rate schedule from `OptimConfig`.

The schedule is a pure function of the step (`lr_at`), applied to the parameter groups before every
step, so its "state" is the step itself and resuming needs nothing else.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from medcl_cli.errors import UsageError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "poly", "constant")


def build_optimizer(module: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over the trainable parameters; no weight decay on norms and biases."""
    if cfg.name not in OPTIMIZERS:
        raise UsageError(f"unknown optim.name '{cfg.name}'", f"use one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise UsageError(f"unknown optim.schedule '{cfg.schedule}'", f"use one of {', '.join(SCHEDULES)}")
    if cfg.lr <= 0:
        raise UsageError(f"optim.lr must be positive, found {cfg.lr}")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(cfg.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov))


def lr_at(step: int, total: int, cfg: Any) -> float:
    """Learning rate of step `step` (0-based) of `total`: linear warmup, then cosine / poly / constant."""
    base = float(cfg.lr)
    warm = int(cfg.warmup_steps)
    if warm > 0 and step < warm:
        return base * (step + 1) / warm
    span = max(total - warm, 1)
    t = min(max(step - warm, 0) / span, 1.0)
    if cfg.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "poly":
        return base * (1.0 - t) ** float(cfg.poly_power)
    return base


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
