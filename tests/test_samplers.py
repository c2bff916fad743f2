"""ARCO samplers: NS / SG / SAG / index-order grouping (You et al., NeurIPS 2023, section 3.3).

The statistical tests estimate the mean of h over a fixed synthetic population whose groups differ
strongly (Theorem 3.2: SG is unbiased and its variance is the NS variance minus the between-group part).
"""

from __future__ import annotations

import torch

from medcl_cli.methods.samplers import (
    grid_groups,
    index_order_groups,
    index_order_partners,
    ns_indices,
    proportional_allocation,
    reflection_partners,
    sag_indices,
    sg_indices,
)

REPEATS = 2000


def _population(seed: int = 0, size: int = 32, grid: int = 4):
    """One 32x32 image: h = strong per-cell offset + noise; plus a class map with unequal class areas."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    cell = (y * grid // size) * grid + (x * grid // size)
    offsets = torch.randn(grid * grid, generator=g, dtype=torch.float64) * 3.0
    h = offsets[cell] + 0.5 * torch.randn(y.numel(), generator=g, dtype=torch.float64)
    classes = ((yy - 12) ** 2 + (xx - 14) ** 2 < 60).long().flatten() + (xx > 24).long().flatten()
    return y, x, h, classes


def _estimates(sample, h: torch.Tensor) -> torch.Tensor:
    return torch.stack([h[sample()].mean() for _ in range(REPEATS)])


def test_sg_unbiased_and_lower_variance_than_ns():
    y, x, h, _ = _population()
    truth = h.mean()
    groups = grid_groups(y, x, (32, 32), 4)
    g = torch.Generator().manual_seed(1)
    k = 32
    ns = _estimates(lambda: ns_indices(h.numel(), k, generator=g), h)
    sg = _estimates(lambda: sg_indices(groups, k, generator=g), h)
    se_sg = sg.std() / REPEATS**0.5
    assert abs(sg.mean() - truth) < 4 * se_sg + 1e-3
    assert abs(ns.mean() - truth) < 4 * ns.std() / REPEATS**0.5
    assert sg.var() < 0.8 * ns.var()
    # the between-group part dominates this population, so the reduction is large
    assert sg.var() < 0.3 * ns.var()


def test_sg_unbiased_with_unequal_class_groups():
    """Groups = (class, cell) have very unequal sizes: the systematic rounding keeps E[n_m] exact."""
    y, x, h, classes = _population(seed=3)
    h = h + 5.0 * classes  # class means differ too
    truth = h.mean()
    groups = grid_groups(y, x, (32, 32), 4, classes=classes)
    g = torch.Generator().manual_seed(2)
    sg = _estimates(lambda: sg_indices(groups, 24, generator=g), h)
    assert abs(sg.mean() - truth) < 4 * sg.std() / REPEATS**0.5 + 1e-3


def test_proportional_allocation_expectation_and_total():
    counts = torch.tensor([1, 7, 13, 50, 29])
    g = torch.Generator().manual_seed(0)
    allocs = torch.stack([proportional_allocation(counts, 9, g) for _ in range(4000)]).double()
    assert (allocs.sum(1) == 9).all()
    expected = counts.double() * 9 / counts.sum()
    assert torch.allclose(allocs.mean(0), expected, atol=0.05)
    assert ((allocs - torch.floor(expected)) >= 0).all() and ((allocs - torch.floor(expected)) <= 1).all()


def test_sg_without_replacement_and_with_replacement_when_k_exceeds_n():
    groups = torch.tensor([0] * 5 + [1] * 15)
    g = torch.Generator().manual_seed(0)
    idx = sg_indices(groups, 12, generator=g)
    assert idx.numel() == 12 and idx.unique().numel() == 12
    assert torch.bincount(groups[idx]).tolist() == [3, 9]
    big = sg_indices(groups, 50, generator=g)
    assert big.numel() == 50 and int(big.max()) < 20
    assert ns_indices(20, 50, generator=g).numel() == 50


def test_sag_pairs_are_reflections_inside_their_group():
    size, grid = 32, 4
    b = torch.arange(2).repeat_interleave(size * size)
    y = torch.arange(size).repeat_interleave(size).repeat(2)
    x = torch.arange(size).repeat(size * 2)
    groups = grid_groups(y, x, (size, size), grid)
    partners = reflection_partners(b, y, x, (2, size, size), grid, groups)
    assert (partners >= 0).all()  # full grid: every pixel has its reflection
    g = torch.Generator().manual_seed(0)
    idx = sag_indices(groups, partners, 64, generator=g)
    half = idx.numel() // 2
    p, q = idx[:half], idx[half : 2 * half]
    assert (groups[p] == groups[q]).all() and (b[p] == b[q]).all()
    cell = size // grid
    cy, cx = (y[p] // cell) * cell + (cell - 1) / 2, (x[p] // cell) * cell + (cell - 1) / 2
    # p' = 2 c_m - p
    assert torch.equal(y[q].double(), 2 * cy - y[p]) and torch.equal(x[q].double(), 2 * cx - x[p])


def test_sag_unbiased_when_reflections_leave_the_class():
    """Class-restricted groups: a reflection outside the candidate set pairs the draw with itself."""
    y, x, h, classes = _population(seed=5)
    keep = classes == 1
    yk, xk, hk = y[keep], x[keep], h[keep]
    groups = grid_groups(yk, xk, (32, 32), 4)
    partners = reflection_partners(torch.zeros_like(yk), yk, xk, (1, 32, 32), 4, groups)
    assert (partners == -1).any() and (partners >= 0).any()
    ok = partners >= 0
    assert (groups[partners[ok]] == groups[ok]).all()
    g = torch.Generator().manual_seed(4)
    est = _estimates(lambda: sag_indices(groups, partners, 20, generator=g), hk)
    assert abs(est.mean() - hk.mean()) < 4 * est.std() / REPEATS**0.5 + 1e-3


def test_index_order_groups_match_the_code_layout():
    groups = index_order_groups(100, cuts=4)  # 10 x 10 square, blocks of 3/2/3/2 rows and columns
    square = groups.view(10, 10)
    assert square[0, 0] == square[2, 2] and square[0, 0] != square[3, 0] and square[0, 2] != square[0, 3]
    assert groups.unique().numel() == 16
    partners = index_order_partners(100, cuts=4)
    assert (partners >= 0).all() and torch.equal(partners[partners], torch.arange(100))
    assert (groups[partners] == groups).all()
    odd = index_order_partners(90, cuts=4)  # last row incomplete: reflections past n-1 are -1
    assert (odd == -1).any() and int(odd.max()) < 90
