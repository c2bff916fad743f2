"""PDCR losses against slow, obvious references: per-patch crops in loops and a naive double loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medcl_cli.methods.losses.patch_contrast import affinity_contrast, foreground_ratios
from medcl_cli.methods.samplers import grid_positions


def _ratios_by_loops(label: torch.Tensor, centres: torch.Tensor, sizes: list[int], num_classes: int) -> torch.Tensor:
    """Crop each patch (clipped at the image edge), count each foreground class, divide by k^D."""
    b, dims = label.shape[0], label.dim() - 1
    out = torch.zeros(b, len(sizes), len(centres), num_classes - 1)
    for i in range(b):
        for p, k in enumerate(sizes):
            r = k // 2
            for n, c in enumerate(centres.tolist()):
                crop = label[i][tuple(slice(max(x - r, 0), x + r + 1) for x in c)]
                for cls in range(1, num_classes):
                    out[i, p, n, cls - 1] = (crop == cls).sum().item() / k**dims
    return out


def test_foreground_ratios_match_per_patch_loops_2d():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(-1, 4, (3, 21, 26), generator=g)  # -1 = ignore (counts as background)
    centres = torch.tensor([[0, 0], [20, 25], [10, 13], [3, 24], [17, 1], [9, 9]])  # edges included
    sizes = [5, 7, 9]
    got = foreground_ratios(label, centres, torch.tensor(sizes), num_classes=4)
    assert got.shape == (3, 3, 6, 3)
    torch.testing.assert_close(got, _ratios_by_loops(label, centres, sizes, 4), rtol=0, atol=1e-7)
    # and it is the avg-pooled one-hot mask gathered at the centres (the formulation in methods.md)
    onehot = F.one_hot(label.clamp(min=0), 4).permute(0, 3, 1, 2)[:, 1:].float() * (label >= 0)[:, None]
    for p, k in enumerate(sizes):
        pooled = F.avg_pool2d(onehot, k, stride=1, padding=k // 2)[:, :, centres[:, 0], centres[:, 1]]
        torch.testing.assert_close(got[:, p], pooled.permute(0, 2, 1), rtol=0, atol=1e-6)


def test_foreground_ratios_3d_and_per_centre_sizes():
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 3, (2, 9, 10, 11), generator=g)
    centres = torch.tensor([[0, 0, 0], [4, 5, 5], [8, 9, 10], [2, 7, 1]])
    got = foreground_ratios(label, centres, torch.tensor([3, 5]), num_classes=3)
    torch.testing.assert_close(got, _ratios_by_loops(label, centres, [3, 5], 3), rtol=0, atol=1e-7)
    # P x N sizes: each centre its own patch (RF-PDCR with a per-layer receptive field)
    per = torch.tensor([[3, 5, 7, 9]])
    got2 = foreground_ratios(label, centres, per, num_classes=3)
    for n, k in enumerate([3, 5, 7, 9]):
        ref = _ratios_by_loops(label, centres[n : n + 1], [k], 3)
        torch.testing.assert_close(got2[:, :, n : n + 1], ref, rtol=0, atol=1e-7)


def test_foreground_ratios_huge_patch_covers_the_image():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[0, :4] = 1
    got = foreground_ratios(label, torch.tensor([[4, 4]]), torch.tensor([141]), num_classes=2)
    assert got.item() == pytest.approx(32 / 141**2)


def _affinity_loss_by_loops(q, rho_q, k, rho_k, tau):
    """The 3D-code formula, element by element."""
    b = q.shape[0]
    s = [[[0.0] * k.shape[1] for _ in range(q.shape[1])] for _ in range(b)]
    top = -math.inf
    for i in range(b):
        for n in range(q.shape[1]):
            for m in range(k.shape[1]):
                s[i][n][m] = F.cosine_similarity(q[i, n], k[i, m], dim=0).item() / tau
                top = max(top, s[i][n][m])
    total, count = 0.0, 0
    for i in range(b):
        for n in range(q.shape[1]):
            denom = 0.0
            for m in range(k.shape[1]):
                d = (rho_q[i, n] - rho_k[i, m]).abs().sum().item()
                denom += math.exp((s[i][n][m] - top) * d)
            for m in range(k.shape[1]):
                a = 1 - (rho_q[i, n] - rho_k[i, m]).abs().sum().item()
                total += -math.log(math.exp((s[i][n][m] - top) * a) / denom)
                count += 1
    return total / count


def test_affinity_contrast_matches_naive_double_loop():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 7, 5, generator=g)
    rho = torch.rand(2, 7, 3, generator=g) / 3
    got = affinity_contrast(q, rho, tau=0.5)
    assert got.item() == pytest.approx(_affinity_loss_by_loops(q, rho, q, rho, 0.5), rel=1e-5)
    # cross-layer form: two different vector sets and ratio sets
    k = torch.randn(2, 4, 5, generator=g)
    rho_k = torch.rand(2, 4, 3, generator=g) / 3
    got = affinity_contrast(q, rho, k, rho_k, tau=0.7)
    assert got.item() == pytest.approx(_affinity_loss_by_loops(q, rho, k, rho_k, 0.7), rel=1e-5)


def test_affinity_contrast_broadcasts_one_loss_per_patch_size():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 4, generator=g)
    rho = torch.rand(2, 3, 6, 1, generator=g)  # B x P x N x F
    got = affinity_contrast(q[:, None], rho)
    # the global max is the same for every size (self-pairs have cos 1), so the mean of the per-size losses
    per_size = torch.stack([affinity_contrast(q, rho[:, p]) for p in range(3)]).mean()
    torch.testing.assert_close(got, per_size)


def test_affinity_contrast_tugs_same_composition_and_repulses_different():
    # two groups of patches: pure foreground and pure background; features either aligned with the groups
    # (good) or swapped (bad). The loss must prefer the good embedding and its gradient must move towards it.
    rho = torch.tensor([[[1.0], [1.0], [0.0], [0.0]]])
    good = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    bad = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]])
    assert affinity_contrast(good, rho).item() < affinity_contrast(bad, rho).item()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 8, generator=g).requires_grad_(True)
    rho8 = torch.tensor([[[1.0], [0.0]] * 4])
    opt = torch.optim.SGD([x], lr=0.5)
    start = affinity_contrast(x, rho8).item()
    for _ in range(40):
        opt.zero_grad()
        affinity_contrast(x, rho8).backward()
        opt.step()
    z = F.normalize(x.detach()[0], dim=-1)
    cos = z @ z.T
    same = (rho8[0] - rho8[0].T).abs() == 0
    off_diag = ~torch.eye(8, dtype=torch.bool)
    assert affinity_contrast(x, rho8).item() < start
    assert cos[same & off_diag].mean() > 0.5 > cos[~same].mean()  # tugged together / repulsed apart


def test_grid_positions_bounded_regular_and_away_from_the_border():
    idx = grid_positions((32, 32), 64, border=3)
    assert idx.dtype == torch.long and idx.numel() == 64 and idx.unique().numel() == 64
    yx = torch.stack(torch.unravel_index(idx, (32, 32)), -1)
    assert yx.min().item() >= 3 and yx.max().item() <= 28
    ys = yx[:, 0].unique()
    assert ys.numel() == 8 and (ys.diff() - ys.diff()[0]).abs().max().item() <= 1  # evenly strided
    cases = [((16, 16), 50, 2), ((9, 40), 20, 1), ((100, 1), 4, 0), ((6, 6, 6), 27, 1), ((3, 3), 99, 9)]
    for shape, n, border in cases:
        got = grid_positions(shape, n, border)
        assert 1 <= got.numel() <= n and got.unique().numel() == got.numel()
        assert got.max().item() < math.prod(shape)
