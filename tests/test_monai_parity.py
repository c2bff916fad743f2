"""medcl against MONAI, the field's standard: the Dice + CE loss (built on MONAI's DiceLoss) equals a naive
reference and MONAI's DiceCELoss; the hand-written metrics (kept: measured faster, evaluate/metrics.py)
equal MONAI's Dice, HD95 and surface Dice on real-ish predictions (ACDC masks, moved and damaged)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from medcl_cli.evaluate import metrics as M
from medcl_cli.methods.losses.segmentation import dice_ce_parts

monai_metrics = pytest.importorskip("monai.metrics")


def _naive_dice_ce(logits: torch.Tensor, label: torch.Tensor, eps: float = 1e-5) -> tuple[float, float]:
    """Class by class, pixel lists in plain Python sums: the definition, slowly."""
    prob = logits.double().softmax(1)
    keep = label >= 0
    losses = []
    for k in range(logits.shape[1]):
        p = prob[:, k][keep]
        t = (label[keep] == k).double()
        losses.append(1 - (2 * float((p * t).sum()) + eps) / (float(p.sum()) + float(t.sum()) + eps))
    logp = prob.log().movedim(1, -1)[keep]
    ce = -float(logp[torch.arange(len(logp)), label[keep]].mean())
    return sum(losses) / len(losses), ce


def test_dice_ce_equals_the_definition_and_monai_dicece():
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 12, 10, generator=g)
    label = torch.randint(0, 3, (4, 12, 10), generator=g)
    label[1] = -1  # an unlabelled slice
    label[2, :4] = -1  # and a partly labelled one
    dice, ce = dice_ce_parts(logits, label)
    ref_dice, ref_ce = _naive_dice_ce(logits, label)
    assert dice.item() == pytest.approx(ref_dice, abs=1e-6) and ce.item() == pytest.approx(ref_ce, abs=1e-6)
    full = torch.randint(0, 3, (4, 12, 10), generator=g)  # MONAI's DiceCELoss has no ignore value: all labelled
    monai = DiceCELoss(softmax=True, to_onehot_y=True, batch=True)(logits, full[:, None])
    assert sum(dice_ce_parts(logits, full)).item() == pytest.approx(monai.item(), abs=1e-6)
    x = logits.clone().requires_grad_(True)
    sum(dice_ce_parts(x, label)).backward()
    assert x.grad is not None and x.grad[1].abs().max() == 0  # ignored pixels get no gradient
    zero_d, zero_c = dice_ce_parts(x, torch.full_like(label, -1))
    assert zero_d.item() == 0 and zero_c.item() == 0 and zero_d.requires_grad


def _monai_class(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tol: float) -> tuple[float, float, float]:
    p, r = (torch.from_numpy(a)[None, None].float() for a in (pred, ref))
    dice = monai_metrics.compute_dice(p, r, include_background=True).item()
    hd = monai_metrics.compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=list(spacing)).item()
    nsd = monai_metrics.compute_surface_dice(p, r, [tol], include_background=True, spacing=list(spacing)).item()
    return dice, hd, nsd


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_metrics_equal_monai_on_acdc_masks(shared_data):
    rng = np.random.default_rng(0)
    lab = sitk.ReadImage(str(shared_data("acdc") / "labels" / "patient041_frame01.nii.gz"))
    ref = sitk.GetArrayFromImage(lab)
    spacing = tuple(reversed(lab.GetSpacing()))  # (z, y, x), anisotropic: 10 mm between slices
    pred = np.roll(ref, 2, axis=2)  # a shifted prediction
    pred[ndimage.binary_dilation(ref == 3, iterations=2) & (pred == 0)] = 3  # an over-segmented class
    pred[rng.random(pred.shape) < 0.002] = 2  # scattered false positives far away (a long HD95 tail)
    for k in (1, 2, 3):
        ours = M.class_metrics(pred == k, ref == k, spacing, 1.5)
        dice, hd, nsd = _monai_class(pred == k, ref == k, spacing, 1.5)
        assert ours["dice"] == pytest.approx(dice, rel=1e-6)
        assert ours["hd95_mm"] == pytest.approx(hd, rel=1e-6) and ours["hd95_mm"] > 0
        assert ours["nsd"] == pytest.approx(nsd, rel=1e-6) and 0 < ours["nsd"] < 1
    empty = np.zeros_like(ref, dtype=bool)
    assert not np.isfinite(_monai_class(empty, ref == 1, spacing, 1.5)[1])  # MONAI: inf/NaN for a missed class
    assert M.class_metrics(empty, ref == 1, spacing)["hd95_mm"] == pytest.approx(M.diagonal_mm(ref.shape, spacing))
