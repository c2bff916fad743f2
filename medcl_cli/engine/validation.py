"""Validation during training: mean foreground Dice per 3D volume on the original slice grid.

Slices come from the cache (the same preprocessing evaluation and prediction use), predictions go back
through `preprocess.logits_to_volume`, and Dice is computed against the label volume as stored. This is
the fast in-loop number that picks `best.pt`; the full metrics (HD95, NSD, ...) are `medcl evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from medcl_cli.data.dataset import SliceSet
from medcl_cli.data.io import read_image
from medcl_cli.data.preprocess import PrepInfo, logits_to_volume
from medcl_cli.engine.device import autocast


@dataclass
class ValCase:
    index: int  # into slices.case_ids
    rows: np.ndarray  # slice rows in the cache
    label: torch.Tensor  # Z x Y x X long, original grid
    info: PrepInfo


def load_val_cases(slices: SliceSet, split: str = "val", mode: str = "resize") -> list[ValCase]:
    """The labelled cases of `split` with their label volumes in memory (read once per run)."""
    out = []
    size = int(slices.images.shape[-1])
    for ci, (cid, sp) in enumerate(zip(slices.case_ids, slices.case_split)):
        if sp != split or not slices.case_has_label[ci]:
            continue
        lp = slices.folder.label_path(cid)
        assert lp is not None
        lab = torch.from_numpy(sitk.GetArrayFromImage(read_image(lp)).astype(np.int64))
        lab = lab[None] if lab.ndim == 2 else lab
        out.append(ValCase(ci, slices.case_slices(ci), lab, PrepInfo(size, mode, slices.shapes_yx[ci])))
    return out


def dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Foreground Dice per class (K-1), NaN where the class is absent from both (not counted)."""
    k = num_classes
    conf = torch.bincount((ref.reshape(-1) * k + pred.reshape(-1)).long(), minlength=k * k).view(k, k).double()
    tp = conf.diag()
    denom = conf.sum(0) + conf.sum(1)
    dice = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))
    return dice[1:]


@torch.no_grad()
def validate(
    net: nn.Module,
    slices: SliceSet,
    cases: list[ValCase],
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 32,
) -> dict[str, float]:
    """Mean foreground Dice over the validation volumes (`val_dice`) and per class (`val_dice_<k>`)."""
    if not cases:
        return {}
    was_training = net.training
    net.eval()
    k = slices.num_classes
    per_case = []
    try:
        for case in cases:
            x = slices.image_rows(case.rows)
            outs = []
            for i in range(0, len(x), batch):
                xb = x[i : i + batch].to(device, non_blocking=True)
                if device.type == "cuda":
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast(device, dtype):
                    outs.append(net(xb).logits.float().cpu())
            logits = torch.cat(outs)
            pred = logits_to_volume(logits, case.info).argmax(1)
            per_case.append(dice_per_class(pred, case.label, k))
    finally:
        net.train(was_training)
    d = torch.stack(per_case)  # cases x (K-1)
    case_mean = torch.nanmean(d, dim=1)
    out = {"val_dice": float(torch.nanmean(case_mean))}
    for c in range(d.shape[1]):
        out[f"val_dice_{c + 1}"] = float(torch.nanmean(d[:, c]))
    return out
