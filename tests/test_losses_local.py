"""semicl's supervised local contrast (Hu et al. 2021) against a naive loop reference and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medcl_cli.methods.losses.local_contrast import local_supcon, local_supcon_blocks, local_supcon_terms
from medcl_cli.methods.samplers import block_partition, stride_indices
from medcl_cli.methods.semicl import block_pixels, stride_pixels


def ref_anchor_losses(z: torch.Tensor, labels: list[int], tau: float, form: str) -> list[torch.Tensor]:
    """The loss of every anchor of one pool, written straight from the formulas (methods.md section 2)."""
    n = len(labels)
    out = []
    for a in range(n):
        if labels[a] <= 0:
            continue
        others = [k for k in range(n) if k != a and labels[k] >= 0]
        positives = [p for p in others if labels[p] == labels[a]]
        negatives = [k for k in others if labels[k] != labels[a]]
        if not positives:
            continue

        def e(k: int) -> torch.Tensor:
            return torch.exp(z[a] @ z[k] / tau)

        if form == "code":
            den = sum(e(k) for k in others)
            out.append(-sum(torch.log(e(p) / den) for p in positives) / len(positives))
        else:
            if not negatives:
                continue
            out.append(-torch.log(sum(e(p) for p in positives) / sum(e(k) for k in negatives)) / len(positives))
    return out


def ref_pool(z, labels, tau, form) -> torch.Tensor:
    losses = ref_anchor_losses(z, labels.tolist(), tau, form)
    return torch.stack(losses).mean() if losses else torch.zeros((), dtype=z.dtype)


def ref_blocks(z, labels, tau, form) -> torch.Tensor:
    means = []
    for g in range(z.shape[0]):
        losses = ref_anchor_losses(z[g], labels[g].tolist(), tau, form)
        if losses:
            means.append(torch.stack(losses).mean())
    return torch.stack(means).mean() if means else torch.zeros((), dtype=z.dtype)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _labels(*shape: int, seed: int, low: int = -1, high: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=g)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_pool_matches_loop_reference(form):
    z, lab = _unit(23, 6, seed=0), _labels(23, seed=1)
    for tau in (0.1, 0.7):
        assert torch.allclose(local_supcon(z, lab, tau, form), ref_pool(z, lab, tau, form), atol=1e-10)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_blocks_match_loop_reference_and_gradients_agree(form):
    z, lab = _unit(5, 12, 4, seed=2), _labels(5, 12, seed=3)
    lab[1] = torch.where(lab[1] > 0, 0, lab[1])  # a block without anchors
    lab[2] = 2  # a block of one class: no negatives (paper form drops its anchors)
    za = z.clone().requires_grad_(True)
    zb = z.clone().requires_grad_(True)
    got = local_supcon_blocks(za, lab, 0.2, form)
    want = ref_blocks(zb, lab, 0.2, form)
    assert torch.allclose(got, want, atol=1e-10)
    got.backward()
    want.backward()
    assert torch.allclose(za.grad, zb.grad, atol=1e-9)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_chunked_rows_and_groups_give_the_same_loss_and_gradient(form):
    z, lab = _unit(4, 30, 8, seed=4), _labels(4, 30, seed=5)
    grads = []
    values = []
    for chunk in (1 << 22, 1000, 90, 7):  # one piece; two groups a piece; rows split
        x = z.clone().requires_grad_(True)
        loss = local_supcon_blocks(x, lab, 0.3, form, chunk=chunk)
        loss.backward()
        values.append(loss.detach())
        grads.append(x.grad)
    for v, g in zip(values[1:], grads[1:]):
        assert torch.allclose(v, values[0], atol=1e-12)
        assert torch.allclose(g, grads[0], atol=1e-12)


def test_code_form_equals_the_shared_supcon_with_background_anchors_masked():
    from medcl_cli.methods.losses import contrastive as losses

    if not hasattr(losses, "supcon"):
        pytest.skip("shared supcon not present")
    z, lab = _unit(40, 5, seed=6), _labels(40, seed=7)
    shared = losses.supcon(z, lab.clamp(min=0), 0.1, anchor_mask=lab > 0, key_mask=lab >= 0, form="out")
    assert torch.allclose(local_supcon(z, lab, 0.1, "code"), shared, atol=1e-10)


def test_ignored_pixels_change_nothing_and_no_anchor_gives_attached_zero():
    z, lab = _unit(10, 4, seed=8), _labels(10, seed=9, low=0)
    extra = torch.cat([z, _unit(3, 4, seed=10)])
    assert torch.allclose(local_supcon(z, lab, 0.1), local_supcon(extra, torch.cat([lab, torch.full((3,), -1)]), 0.1))
    x = z.clone().requires_grad_(True)
    loss = local_supcon(x, torch.zeros(10, dtype=torch.long), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None and not x.grad.abs().any()
    with pytest.raises(ValueError):
        local_supcon(z, lab, 0.1, form="mean")


def test_terms_report_anchor_counts():
    lab = torch.tensor([[1, 1, 0, -1], [0, 0, 0, 0], [2, 1, 0, 0]])
    _, count = local_supcon_terms(_unit(3, 4, 3, seed=11), lab, 0.5)
    assert count.tolist() == [2, 0, 0]  # group 2: each class has one member, so no positives


# ---- samplers and pixel grouping, on cases small enough to compute by hand ----


def test_stride_and_block_indices_by_hand():
    assert stride_indices((5, 4), 2).tolist() == [0, 2, 8, 10, 16, 18]
    assert block_partition((4, 5), 2).tolist() == [[0, 1, 5, 6], [2, 3, 7, 8], [10, 11, 15, 16], [12, 13, 17, 18]]
    assert block_partition((2, 4, 4), 2).shape == (4, 8)
    with pytest.raises(ValueError):
        block_partition((4, 4), 5)


def _hand_maps(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two identical views of one 4x4 image: foreground pixels embed to e1, background to e2."""
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    feat = torch.where((labels > 0)[..., None], e1, e2).permute(2, 0, 1)  # 2 x 4 x 4
    return torch.stack([feat, feat]), torch.stack([labels, labels])


def test_stride_mode_by_hand():
    # strided pixels (0,0),(0,2),(2,0),(2,2) = [1, 0, 0, 0]; class 2 off the grid must not count
    lab = torch.tensor([[1, 2, 0, 2], [2, 2, 2, 2], [0, 2, 0, 2], [2, 2, 2, 2]])
    feat, labels = _hand_maps(lab)
    z, zl = stride_pixels(feat, labels, 2)
    assert zl.tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    tau = 0.5
    # each of the 2 anchors: one positive (its other view, s = 1/tau), six background negatives (s = 0)
    assert math.isclose(local_supcon(z, zl, tau, "code").item(), math.log(1 + 6 * math.exp(-1 / tau)))
    assert math.isclose(local_supcon(z, zl, tau, "paper").item(), math.log(6) - 1 / tau)


def test_block_mode_by_hand():
    lab = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 2, 2], [0, 0, 2, 2]])
    feat, labels = _hand_maps(lab)
    z, zl = block_pixels(feat, labels, 2)
    assert zl.shape == (3, 8)  # the all-background top-right block is dropped
    tau = 0.5
    k = math.exp(-1 / tau)
    # block 1: 2 anchors, 1 positive, 6 negatives; block 3: 4 anchors, 3 positives, 4 negatives;
    # block 4: 8 anchors of class 2, 7 positives, no negatives (the paper form has no loss there)
    code = [math.log(1 + 6 * k), math.log(3 + 4 * k), math.log(7)]
    paper = [math.log(6) - 1 / tau, (math.log(4 / 3) - 1 / tau) / 3]
    assert math.isclose(local_supcon_blocks(z, zl, tau, "code").item(), sum(code) / 3)
    assert math.isclose(local_supcon_blocks(z, zl, tau, "paper").item(), sum(paper) / 2)


def test_grouping_keeps_views_and_images_together():
    g = torch.Generator().manual_seed(12)
    feat = torch.randn(4, 3, 8, 8, generator=g)
    labels = torch.randint(0, 3, (4, 8, 8), generator=g)
    labels[:, :4, 4:] = 0  # block 1 (top right, 4x4 blocks) background everywhere
    z, zl = block_pixels(feat, labels, 4)
    assert z.shape == (3, 4 * 16, 3) and zl.shape == (3, 64)
    # group 2 = bottom-left block: map m's pixels are rows 16m..16m+15, in row-major order
    assert torch.equal(z[1, 16:32], feat[1, :, 4:, :4].permute(1, 2, 0).reshape(16, 3))
    assert torch.equal(zl[1, 16:32], labels[1, 4:, :4].reshape(16))
    zs, ls = stride_pixels(feat, labels, 3)
    assert torch.equal(zs.reshape(4, 9, 3), feat[:, :, ::3, ::3].permute(0, 2, 3, 1).reshape(4, 9, 3))
    assert torch.equal(ls, labels[:, ::3, ::3].reshape(-1))
