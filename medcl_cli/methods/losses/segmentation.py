"""The segmentation loss every fine-tuning method shares: soft Dice + cross-entropy over labelled pixels.

The Dice term is MONAI's `DiceLoss` (the field's standard), the cross-entropy torch's, both over the
labelled pixels only (label -1 = ignore). Settings, equal to what medcl computed by hand before (tested in
tests/test_monai_parity.py, difference 0 up to float rounding): softmax probabilities, one-hot targets,
background included, `batch=True` (Dice over the whole batch per class, so a class absent from a small
batch does not explode), smoothing 1e-5 in numerator and denominator, mean over the K classes. Ignored
pixels are zeroed in both the probabilities and the one-hot target, which removes them from every sum.
Cost, measured on 2 CPU cores (16 x 4 x 128 x 128, forward + backward): 38 ms against 26 ms by hand, under
1% of a default supervised step (about 1.8 s); `import monai` (1.5-2 s beyond what training imports
anyway) is paid once per training process, at the first call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SMOOTH = 1e-5
_DICE: dict[float, Any] = {}  # one MONAI DiceLoss per smoothing value, built on first use (import monai: seconds)


def _monai_dice(eps: float) -> Any:
    if eps not in _DICE:
        from monai.losses import DiceLoss

        _DICE[eps] = DiceLoss(include_background=True, batch=True, smooth_nr=eps, smooth_dr=eps, reduction="mean")
    return _DICE[eps]


def dice_ce_parts(logits: torch.Tensor, label: torch.Tensor, eps: float = SMOOTH) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft Dice loss, cross-entropy) of logits B x K x ... against labels B x ... (-1 = ignore).

    Dice is computed over the whole batch per class and averaged over the K classes; both are 0 (with a
    gradient path) when no pixel is labelled."""
    valid = label >= 0
    if not bool(valid.any()):
        zero = logits.sum() * 0.0
        return zero, zero
    logits = logits.float()
    ce = F.cross_entropy(logits, label.clamp_min(0).where(valid, torch.full_like(label, -100)), ignore_index=-100)
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(label.clamp_min(0), logits.shape[1]).movedim(-1, 1).to(prob.dtype)
    mask = valid.unsqueeze(1).to(prob.dtype)
    dice = _monai_dice(eps)(prob * mask, onehot * mask)
    return dice, ce


def dice_ce(logits: torch.Tensor, label: torch.Tensor, dice_weight: float = 1.0, ce_weight: float = 1.0) -> torch.Tensor:
    """dice_weight x soft Dice loss + ce_weight x cross-entropy (see `dice_ce_parts`)."""
    dice, ce = dice_ce_parts(logits, label)
    return dice_weight * dice + ce_weight * ce
