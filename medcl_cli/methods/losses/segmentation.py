"""The segmentation loss every fine-tuning method shares: soft Dice + cross-entropy over labelled pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
