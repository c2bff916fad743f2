"""Metrics against slow, direct references on small arrays, and the documented empty-mask rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medcl_cli.evaluate import metrics


def _surface_loop(mask: np.ndarray) -> np.ndarray:
    """Surface by looking at the 2*ndim face neighbours of each voxel one by one (outside = background)."""
    out = np.zeros_like(mask, dtype=bool)
    for idx in itertools.product(*[range(n) for n in mask.shape]):
        if not mask[idx]:
            continue
        for axis in range(mask.ndim):
            for step in (-1, 1):
                nb = list(idx)
                nb[axis] += step
                if nb[axis] < 0 or nb[axis] >= mask.shape[axis] or not mask[tuple(nb)]:
                    out[idx] = True
    return out


def _hd95_bruteforce(a: np.ndarray, b: np.ndarray, spacing) -> float:
    pa = np.argwhere(_surface_loop(a)) * np.asarray(spacing)
    pb = np.argwhere(_surface_loop(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))  # all pairs
    return float(max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95)))


def _nsd_bruteforce(a: np.ndarray, b: np.ndarray, spacing, tol: float) -> float:
    pa = np.argwhere(_surface_loop(a)) * np.asarray(spacing)
    pb = np.argwhere(_surface_loop(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(((d.min(1) <= tol).sum() + (d.min(0) <= tol).sum()) / (len(pa) + len(pb)))


def _random_blob(rng: np.random.Generator, shape) -> np.ndarray:
    centre = rng.uniform(2, np.asarray(shape) - 2)
    radii = rng.uniform(1.5, 4.0, size=len(shape))
    grid = np.indices(shape).astype(float)
    r = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(len(shape)))
    return (r <= 1.0) | (rng.random(shape) < 0.03)  # ragged: a few isolated voxels too


def test_surface_matches_loop():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = _random_blob(rng, (6, 9, 8))
        np.testing.assert_array_equal(metrics.surface(m), _surface_loop(m))


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_bruteforce(seed):
    rng = np.random.default_rng(seed)
    shape = (7, 12, 11)
    spacing = (3.0, 0.8, 1.3)  # anisotropic, array order (z, y, x)
    a, b = _random_blob(rng, shape), _random_blob(rng, shape)
    got = metrics.class_metrics(a, b, spacing)
    inter = sum(bool(x and y) for x, y in zip(a.ravel(), b.ravel()))
    na, nb = int(a.sum()), int(b.sum())
    assert got["dice"] == pytest.approx(2 * inter / (na + nb))
    assert got["iou"] == pytest.approx(inter / (na + nb - inter))
    assert got["hd95_mm"] == pytest.approx(_hd95_bruteforce(a, b, spacing), rel=1e-9, abs=1e-9)
    assert got["nsd"] == pytest.approx(_nsd_bruteforce(a, b, spacing, metrics.NSD_TOLERANCE_MM))
    assert metrics.class_metrics(a, b, spacing, 2.0)["nsd"] == pytest.approx(_nsd_bruteforce(a, b, spacing, 2.0))
    vox = 3.0 * 0.8 * 1.3 / 1000
    assert got["vol_pred_ml"] == pytest.approx(na * vox)
    assert got["vol_ref_ml"] == pytest.approx(nb * vox)
    assert got["pred_empty"] is False and got["ref_empty"] is False


def test_hd95_uses_spacing_and_shift():
    """A cube shifted by 2 voxels along x: every surface distance <= 2 * sx, the 95th percentile = 2 * sx."""
    a = np.zeros((10, 10, 20), bool)
    a[3:7, 3:7, 3:9] = True
    b = np.roll(a, 2, axis=2)
    assert metrics.hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(5.0)
    assert metrics.hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_identical_masks_are_perfect():
    a = np.zeros((5, 8, 8), bool)
    a[1:4, 2:6, 2:5] = True
    m = metrics.class_metrics(a, a.copy(), (2.0, 1.0, 1.0))
    assert (m["dice"], m["iou"], m["hd95_mm"], m["nsd"]) == (1.0, 1.0, 0.0, 1.0)


def test_empty_rules():
    shape, spacing = (4, 10, 12), (5.0, 1.5, 1.5)
    empty = np.zeros(shape, bool)
    full = empty.copy()
    full[1:3, 2:5, 2:5] = True
    both = metrics.class_metrics(empty, empty, spacing)
    assert (both["dice"], both["iou"], both["hd95_mm"], both["nsd"]) == (1.0, 1.0, 0.0, 1.0)
    assert both["pred_empty"] and both["ref_empty"]
    diag = math.sqrt(20.0**2 + 15.0**2 + 18.0**2)
    missed = metrics.class_metrics(empty, full, spacing)
    assert (missed["dice"], missed["iou"], missed["nsd"]) == (0.0, 0.0, 0.0)
    assert missed["hd95_mm"] == pytest.approx(diag)
    assert missed["pred_empty"] and not missed["ref_empty"]
    spurious = metrics.class_metrics(full, empty, spacing)
    assert spurious["dice"] == 0.0 and spurious["hd95_mm"] == pytest.approx(diag)
    assert spurious["ref_empty"] and not spurious["pred_empty"]


def test_case_rows_and_summary_never_drop_cases():
    labels = {0: "background", 1: "A", 2: "B"}
    ref = np.zeros((3, 8, 8), np.uint8)
    ref[1, 2:5, 2:5] = 1
    ref[1, 5:7, 5:7] = 2
    good = ref.copy()
    missed = ref.copy()
    missed[missed == 2] = 0  # class B missed
    rows = metrics.case_metrics("c1", good, ref, (1, 1, 1), labels) + metrics.case_metrics(
        "c2", missed, ref, (1, 1, 1), labels
    )
    per_case = metrics.per_case_frame(rows)
    assert list(per_case.columns) == metrics.PER_CASE_COLUMNS
    assert len(per_case) == 4 and set(per_case["label"]) == {"A", "B"}
    summ = metrics.summarize(per_case)
    b = summ[(summ.label == "B") & (summ.metric == "dice")].iloc[0]
    assert (b["mean"], b["n"], b["n_nan"]) == (0.5, 2, 0)  # the miss counts as 0, not dropped
    hd_b = summ[(summ.label == "B") & (summ.metric == "hd95_mm")].iloc[0]
    assert hd_b["mean"] == pytest.approx(math.sqrt(3**2 + 8**2 + 8**2) / 2)
    overall = summ[(summ.label == metrics.OVERALL) & (summ.metric == "dice")].iloc[0]
    assert overall["mean"] == pytest.approx((1.0 + 0.5) / 2) and overall["n"] == 2


def test_summary_counts_nan():
    import pandas as pd

    per_case = pd.DataFrame(
        [
            {"case_id": "a", "label": "A", "class_id": 1, "dice": 0.8, "iou": 0.6, "hd95_mm": 2.0,
             "nsd": 0.9, "vol_pred_ml": 1, "vol_ref_ml": 1, "pred_empty": False, "ref_empty": False},
            {"case_id": "b", "label": "A", "class_id": 1, "dice": float("nan"), "iou": 0.5, "hd95_mm": 4.0,
             "nsd": 0.8, "vol_pred_ml": 1, "vol_ref_ml": 1, "pred_empty": False, "ref_empty": False},
        ]
    )
    summ = metrics.summarize(per_case)
    row = summ[(summ.label == "A") & (summ.metric == "dice")].iloc[0]
    assert (row["n"], row["n_nan"], row["mean"]) == (2, 1, 0.8)
    overall = summ[(summ.label == metrics.OVERALL) & (summ.metric == "dice")].iloc[0]
    assert overall["n_nan"] == 1
    js = metrics.summary_dict(per_case, summ)
    assert js["metrics"]["A"]["dice"]["n_nan"] == 1 and js["n_cases"] == 2
