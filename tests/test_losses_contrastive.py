"""The global / supervised contrastive losses against slow, obvious references (loops over anchors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medcl_cli.methods.losses.contrastive import nt_xent, pixel_supcon, supcon


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    losses = []
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        den = sum(torch.exp(z[i] @ z[k] / tau) for k in range(2 * n) if k != i)
        losses.append(-torch.log(torch.exp(z[i] @ z[pos] / tau) / den))
    return torch.stack(losses).mean()


def ref_supcon(z, labels, tau, anchor_mask=None, key_mask=None, form="out") -> torch.Tensor:
    n = z.shape[0]
    keys = [True] * n if key_mask is None else key_mask.tolist()
    anchors = keys if anchor_mask is None else [a and b for a, b in zip(keys, anchor_mask.tolist())]
    lab = labels.tolist()
    losses = []
    for i in range(n):
        if not anchors[i] or lab[i] < 0:
            continue
        others = [k for k in range(n) if k != i and keys[k]]
        positives = [p for p in others if lab[p] == lab[i]]
        if not positives:
            continue
        den = sum(torch.exp(z[i] @ z[k] / tau) for k in others)
        terms = [torch.exp(z[i] @ z[p] / tau) / den for p in positives]
        if form == "out":
            losses.append(-sum(torch.log(t) for t in terms) / len(positives))
        else:
            losses.append(-torch.log(sum(terms) / len(positives)))
    if not losses:
        return torch.zeros((), dtype=z.dtype)
    return torch.stack(losses).mean()


def test_nt_xent_matches_loop_reference():
    z1, z2 = _unit(5, 8, 0), _unit(5, 8, 1)
    for tau in (0.1, 0.5):
        assert torch.allclose(nt_xent(z1, z2, tau), ref_nt_xent(z1, z2, tau), atol=1e-10)


def test_nt_xent_is_low_for_matching_views_and_log_2n_minus_1_for_identical_embeddings():
    z = _unit(6, 16, 2)
    assert nt_xent(z, z, 0.1) < nt_xent(z, _unit(6, 16, 3), 0.1)
    same = F.normalize(torch.ones(4, 3, dtype=torch.float64), dim=1)
    assert torch.allclose(nt_xent(same, same, 0.5), torch.tensor(math.log(7.0), dtype=torch.float64))


@pytest.mark.parametrize("form", ["out", "in"])
def test_supcon_matches_loop_reference_with_missing_labels_and_masks(form):
    z = _unit(12, 6, 4)
    labels = torch.tensor([0, 1, 0, 2, 1, -1, 0, 3, 2, 1, -1, 0])
    anchor = torch.tensor([True, True, False, True, True, True, True, True, True, False, True, True])
    keys = torch.tensor([True] * 10 + [False, True])
    got = supcon(z, labels, 0.2, anchor_mask=anchor, key_mask=keys, form=form)
    want = ref_supcon(z, labels, 0.2, anchor_mask=anchor, key_mask=keys, form=form)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(supcon(z, labels, 0.2, form=form), ref_supcon(z, labels, 0.2, form=form), atol=1e-10)


def test_supcon_gradient_matches_reference_gradient():
    base = _unit(8, 5, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 1, 2])
    za = base.clone().requires_grad_(True)
    zb = base.clone().requires_grad_(True)
    supcon(za, labels, 0.1).backward()
    ref_supcon(zb, labels, 0.1).backward()
    assert torch.allclose(za.grad, zb.grad, atol=1e-9)


def test_supcon_several_labelings_at_once_and_in_chunks():
    z = _unit(10, 4, 6)
    lab = torch.tensor([[0, 0, 1, 1, 2, 2, 0, 1, 2, 0], [3, 4, 3, 4, 3, 4, 3, 4, -1, -1]])
    many = supcon(z, lab, 0.3, chunk=3)
    assert many.shape == (2,)
    for m in range(2):
        assert torch.allclose(many[m], ref_supcon(z, lab[m], 0.3), atol=1e-10)
        assert torch.allclose(supcon(z, lab[m], 0.3, chunk=4), supcon(z, lab[m], 0.3), atol=1e-12)


def test_supcon_without_positives_is_zero_with_finite_zero_gradient():
    z = _unit(5, 3, 7).requires_grad_(True)
    loss = supcon(z, torch.arange(5), 0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(z.grad).all() and (z.grad == 0).all()
    # only one valid key: every row is fully masked, still no NaN
    z2 = _unit(3, 3, 8).requires_grad_(True)
    out = supcon(z2, torch.zeros(3, dtype=torch.long), 0.1, key_mask=torch.tensor([True, False, False]))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(z2.grad).all()


def test_supcon_rejects_unknown_form():
    with pytest.raises(ValueError):
        supcon(_unit(3, 2, 0), torch.zeros(3, dtype=torch.long), form="sideways")


def test_pixel_supcon_matches_loop_over_pixels_and_views():
    b, k, d = 3, 4, 5
    p1 = F.normalize(torch.randn(b, k, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64), dim=-1)
    p2 = F.normalize(torch.randn(b, k, d, generator=torch.Generator().manual_seed(10), dtype=torch.float64), dim=-1)
    labels = torch.tensor([[0, 1, 0], [2, 2, 5]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, True], [False, True, True, True]])
    got = pixel_supcon(p1, p2, labels, 0.2, valid=valid)
    for m in range(2):
        # explicit flattening: every (view, image, pixel) triple is one row
        rows, labs, keys = [], [], []
        for view in (p1, p2):
            for i in range(b):
                for j in range(k):
                    rows.append(view[i, j])
                    labs.append(int(labels[m, i]))
                    keys.append(bool(valid[i, j]))
        want = ref_supcon(torch.stack(rows), torch.tensor(labs), 0.2, key_mask=torch.tensor(keys))
        assert torch.allclose(got[m], want, atol=1e-10)


def test_pixel_supcon_with_positions_pairs_only_same_label_and_same_position():
    b, k, d = 4, 3, 6
    g = torch.Generator().manual_seed(11)
    p1 = F.normalize(torch.randn(b, k, d, generator=g, dtype=torch.float64), dim=-1)
    p2 = F.normalize(torch.randn(b, k, d, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([[0, 0, 1, 0], [1, -1, 1, 2]])
    positions = torch.tensor([[5, 2, 9], [2, 5, 7], [5, 9, 2], [9, 5, 1]])
    valid = torch.tensor([[True, True, True], [True, False, True], [True, True, True], [True, True, False]])
    got = pixel_supcon(p1, p2, labels, 0.3, valid=valid, positions=positions)
    rows = [(v, i, j) for v in range(2) for i in range(b) for j in range(k)]
    z = torch.stack([(p1, p2)[v][i, j] for v, i, j in rows])
    keys = [bool(valid[i, j]) for _, i, j in rows]
    for m in range(2):
        losses = []
        for a, (va, ia, ja) in enumerate(rows):
            if not keys[a] or int(labels[m, ia]) < 0:
                continue
            others = [c for c in range(len(rows)) if c != a and keys[c]]
            pos = [c for c in others if int(labels[m, rows[c][1]]) == int(labels[m, ia])
                   and int(positions[rows[c][1], rows[c][2]]) == int(positions[ia, ja])]
            if not pos:
                continue
            den = sum(torch.exp(z[a] @ z[c] / 0.3) for c in others)
            losses.append(-sum(torch.log(torch.exp(z[a] @ z[c] / 0.3) / den) for c in pos) / len(pos))
        assert torch.allclose(got[m], torch.stack(losses).mean(), atol=1e-10)
