"""`supervised`: soft Dice + cross-entropy on the labelled slices, the baseline every method is measured
against (the SSL4MIS / ARCO recipe: equal weights, Dice over all classes including background).

`dice_ce` is also the segmentation term of the semi-supervised methods (ARCO, PDCR). Pixels labelled -1
(unlabelled slices, or outside an augmented view) are ignored by both terms.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def dice_ce_parts(logits: torch.Tensor, label: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft Dice loss, cross-entropy) of logits B x K x ... against labels B x ... (-1 = ignore).

    Dice is computed over the whole batch per class (a class absent from a small batch does not explode)
    and averaged over the K classes; both are 0 (with a gradient path) when no pixel is labelled."""
    valid = label >= 0
    if not bool(valid.any()):
        zero = logits.sum() * 0.0
        return zero, zero
    logits = logits.float()
    ce = F.cross_entropy(logits, label.clamp_min(0).where(valid, torch.full_like(label, -100)), ignore_index=-100)
    k = logits.shape[1]
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(label.clamp_min(0), k).movedim(-1, 1).to(prob.dtype)
    mask = valid.unsqueeze(1).to(prob.dtype)
    dims = [0] + list(range(2, logits.ndim))
    inter = (prob * onehot * mask).sum(dims)
    denom = (prob * mask).sum(dims) + (onehot * mask).sum(dims)
    dice = 1.0 - ((2 * inter + eps) / (denom + eps)).mean()
    return dice, ce


def dice_ce(logits: torch.Tensor, label: torch.Tensor, dice_weight: float = 1.0, ce_weight: float = 1.0) -> torch.Tensor:
    """dice_weight x soft Dice loss + ce_weight x cross-entropy (see `dice_ce_parts`)."""
    dice, ce = dice_ce_parts(logits, label)
    return dice_weight * dice + ce_weight * ce


class Supervised(nn.Module):
    """Dice + CE on the augmented labelled slices (the sampler only draws labelled slices)."""

    n_views = 1
    needs = {"labeled"}

    def __init__(self, net: nn.Module, cfg: Any, spec: Any) -> None:
        super().__init__()
        self.net = net
        self.dice_weight = float(cfg.supervised.dice_weight)
        self.ce_weight = float(cfg.supervised.ce_weight)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        label = batch["label"]
        logits = self.net(batch["image"]).logits
        dice, ce = dice_ce_parts(logits, label)
        return {"loss": self.dice_weight * dice + self.ce_weight * ce, "dice": dice.detach(), "ce": ce.detach()}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.training_step(batch)
