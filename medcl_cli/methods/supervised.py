"""`supervised`: soft Dice + cross-entropy on the labelled slices, the baseline every method is measured
against (the SSL4MIS / ARCO recipe: equal weights, Dice over all classes including background).

`dice_ce` is also the segmentation term of the semi-supervised methods (ARCO, PDCR). Pixels labelled -1
(unlabelled slices, or outside an augmented view) are ignored by both terms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medcl_cli.methods.losses.segmentation import dice_ce_parts


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
