"""Samplers: functions that return index tensors into a flattened candidate set.

Used to bound the pixel pairs of every dense loss (design.md section 5).
"""

from __future__ import annotations

import math

import torch


def topk_saliency(
    score: torch.Tensor, k: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest-scoring positions of each image (GCL's Gradient Filter).

    score: B x H x W (or B x N) saliency, e.g. the per-pixel gradient magnitude of the image-wise loss.
    valid: same shape, bool; invalid positions are picked only when fewer than k are valid.
    Returns `idx` (B x k', long indices into the flattened H*W positions, highest first) and `keep`
    (B x k' bool, False where the pick is an invalid position), k' = min(k, H*W). The selection is
    discrete, so nothing flows back through it.
    """
    flat = score.detach().reshape(score.shape[0], -1).float()
    kk = min(int(k), flat.shape[1])
    if valid is not None:
        ok = valid.reshape(flat.shape).bool()
        flat = torch.where(ok, flat, torch.full_like(flat, float("-inf")))
    idx = flat.topk(kk, dim=1).indices
    keep = torch.ones_like(idx, dtype=torch.bool) if valid is None else ok.gather(1, idx)
    return idx, keep


def grid_positions(
    shape: tuple[int, ...] | torch.Size, n: int, border: int = 0, device: torch.device | None = None
) -> torch.Tensor:
    """At most `n` positions on a regular grid of a feature map, `border` pixels away from its edges (PDCR).

    shape: the spatial shape (H, W) or (D, H, W). The grid has the same spacing on every axis (about
    (area / n)^(1/D)), points centred in their cells; the border shrinks on an axis too small to keep it.
    Returns long indices (N,) into the flattened positions, N <= n, row-major order; recover coordinates
    with `torch.unravel_index(idx, shape)`. Deterministic, like the official code's strided sampling.
    """
    sizes = [int(s) for s in shape]
    if n < 1 or min(sizes) < 1:
        raise ValueError(f"grid_positions needs n >= 1 and a non-empty shape, found n={n}, shape={sizes}")
    borders = [min(max(int(border), 0), (s - 1) // 2) for s in sizes]
    lengths = [s - 2 * b for s, b in zip(sizes, borders)]
    counts = [1] * len(sizes)
    free = list(range(len(sizes)))
    while free:  # axes shorter than the spacing get one point; the others share n (at most D rounds)
        spacing = (math.prod(lengths[d] for d in free) / n) ** (1.0 / len(free))
        short = [d for d in free if lengths[d] < spacing]
        if not short:
            for d in free:
                counts[d] = max(1, min(lengths[d], int(lengths[d] / spacing + 1e-9)))
            break
        free = [d for d in free if d not in short]
    axes = [
        b + ((torch.arange(g, device=device, dtype=torch.float64) + 0.5) * length / g).long()
        for b, length, g in zip(borders, lengths, counts)
    ]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))
    strides = torch.tensor([math.prod(sizes[d + 1 :]) for d in range(len(sizes))], device=device)
    return (coords * strides).sum(-1)


def stride_indices(
    shape: tuple[int, ...] | torch.Size, stride: int, device: torch.device | None = None
) -> torch.Tensor:
    """Every `stride`-th position along each axis, from 0 (Hu et al.'s downsampling mode, s = 4).

    shape: the spatial shape (H, W) or (D, H, W). Returns long indices (N,) into the flattened positions,
    row-major, N = prod(ceil(s_i / stride)); the same as slicing the map with `[..., ::stride, ::stride]`.
    """
    sizes = [int(s) for s in shape]
    if stride < 1 or min(sizes) < 1:
        raise ValueError(f"stride_indices needs stride >= 1 and a non-empty shape, found {stride}, {sizes}")
    flat = torch.arange(int(torch.tensor(sizes).prod()), device=device).reshape(sizes)
    return flat[tuple(slice(None, None, stride) for _ in sizes)].reshape(-1)


def block_partition(
    shape: tuple[int, ...] | torch.Size, block: int, device: torch.device | None = None
) -> torch.Tensor:
    """Non-overlapping `block`-sized tiles of a map (Hu et al.'s block-division mode, 16 x 16 in the paper).

    shape: the spatial shape (H, W) or (D, H, W). Returns long indices (num_blocks, block**D) into the
    flattened positions: row b lists the positions of tile b (tiles in row-major order, positions inside a
    tile row-major). Positions past the last whole tile on an axis are left out, as in the authors' code.
    """
    sizes = [int(s) for s in shape]
    counts = [s // block for s in sizes] if block >= 1 else []
    if block < 1 or min(counts) < 1:
        raise ValueError(f"block_partition needs 1 <= block <= every side of {sizes}, found block={block}")
    dims = len(sizes)
    flat = torch.arange(int(torch.tensor(sizes).prod()), device=device).reshape(sizes)
    flat = flat[tuple(slice(0, c * block) for c in counts)]
    tiles = flat.reshape([v for c in counts for v in (c, block)])  # n0, b, n1, b, ...
    order = [2 * i for i in range(dims)] + [2 * i + 1 for i in range(dims)]
    return tiles.permute(order).reshape(int(torch.tensor(counts).prod()), block**dims)


# ==== uniform, stratified-group and antithetic sampling (ARCO, You et al., NeurIPS 2023 section 3.3) ===
#
# A dense loss averages a per-pixel term h over pixels; these samplers pick which pixels enter the
# average. Candidates are described by an integer group id each (`grid_groups`, `index_order_groups`);
# SG draws from every group in proportion to its size (Theorem 3.2: unbiased, variance never above NS);
# SAG draws half of that and adds each draw's point reflection through its group centre (Lemma 3.1).


def _generator_device(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    if generator is not None and generator.device != device:
        raise ValueError(f"generator is on {generator.device}, candidates on {device}")
    return generator


def ns_indices(
    n: int,
    k: int,
    *,
    replace: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """NS: `k` indices drawn uniformly from range(n) (without replacement unless `replace` or k > n)."""
    if n <= 0 or k <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if replace or k > n:
        return torch.randint(n, (k,), generator=generator, device=device)
    return torch.randperm(n, generator=generator, device=device)[:k]


def grid_cells(y: torch.Tensor, x: torch.Tensor, size: tuple[int, int], grid: int) -> torch.Tensor:
    """Cell id (row-major, 0..grid*grid-1) of pixels (y, x) in a `grid` x `grid` partition of an H x W image.

    Cell row r holds the rows y with floor(y * grid / H) = r, so cells differ by at most one pixel in size.
    """
    h, w = size
    return (y * grid // h) * grid + (x * grid // w)


def dense_groups(*keys: torch.Tensor) -> torch.Tensor:
    """Combine integer keys (e.g. class and grid cell) into dense group ids 0..M-1 (one per distinct tuple)."""
    combined = torch.zeros_like(keys[0], dtype=torch.long)
    for key in keys:
        key = key.long()
        span = int(key.max().item()) + 1 if key.numel() else 1
        combined = combined * span + key
    return torch.unique(combined, return_inverse=True)[1]


def grid_groups(
    y: torch.Tensor, x: torch.Tensor, size: tuple[int, int], grid: int, classes: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's SG groups: (class, cell of a `grid` x `grid` spatial grid) as dense ids."""
    cells = grid_cells(y, x, size, grid)
    return dense_groups(classes, cells) if classes is not None else dense_groups(cells)


def proportional_allocation(
    counts: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Integer sample sizes n_m summing to k with E[n_m] = k |P_m| / |P| exactly (systematic rounding).

    floor(k p_m) for every group, plus one more for the groups hit by a systematic comb through the
    cumulative fractional parts, so each group's extra draw has probability equal to its fraction.
    """
    total = int(counts.sum().item())
    if total == 0 or k <= 0:
        return torch.zeros_like(counts)
    expected = counts.double() * (k / total)
    base = torch.floor(expected)
    frac = expected - base
    u = torch.rand((), generator=generator, device=counts.device, dtype=torch.float64)
    cum = torch.cumsum(frac, 0)
    prev = torch.cat([cum.new_zeros(1), cum[:-1]])
    extra = torch.floor(cum + u - 1e-9) - torch.floor(prev + u - 1e-9)
    alloc = (base + extra).long()
    # float round-off can leave the total one off: fix it on the largest groups
    diff = k - int(alloc.sum().item())
    if diff != 0:
        order = torch.argsort(counts, descending=True)
        alloc[order[: abs(diff)]] += 1 if diff > 0 else -1
        alloc.clamp_(min=0)
    return alloc


def sg_indices(
    groups: torch.Tensor,
    k: int,
    *,
    replace: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SG: `k` indices into `groups` (N, long group id per candidate), |D_m| proportional to |P_m|.

    Inside a group the draw is uniform without replacement (with replacement when `replace` or k > N).
    Indices come out grouped (group by group); shuffle them if order matters.
    """
    n = groups.numel()
    device = groups.device
    if n == 0 or k <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    _generator_device(generator, device)
    groups = groups.long()
    counts = torch.bincount(groups)
    alloc = proportional_allocation(counts, k, generator)
    starts = torch.cumsum(counts, 0) - counts
    if replace or k > n:
        members = torch.argsort(groups, stable=True)
        gid = torch.repeat_interleave(torch.arange(counts.numel(), device=device), alloc)
        u = torch.rand(gid.numel(), generator=generator, device=device, dtype=torch.float64)
        offset = torch.minimum((u * counts[gid]).long(), counts[gid] - 1)
        return members[starts[gid] + offset]
    keys = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    order = torch.argsort(groups.double() + keys)  # by group, random order inside each group
    ranks = torch.arange(n, device=device) - starts[groups[order]]
    return order[ranks < alloc[groups[order]]]


def reflection_partners(
    b: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    shape: tuple[int, int, int],
    grid: int,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each candidate pixel (b, y, x), the index of the candidate at its point reflection through the
    centre of its grid cell (p' = 2 c_m - p), or -1 when that pixel is not a candidate or is in another
    group. `shape` = (B, H, W) of the images the pixels come from; candidates must be distinct pixels.
    """
    nb, h, w = shape
    device = b.device
    n = b.numel()
    lookup = torch.full((nb * h * w,), -1, dtype=torch.long, device=device)
    lookup[(b * h + y) * w + x] = torch.arange(n, device=device)
    cy = y * grid // h
    cx = x * grid // w
    y0 = (cy * h + grid - 1) // grid
    y1 = ((cy + 1) * h + grid - 1) // grid
    x0 = (cx * w + grid - 1) // grid
    x1 = ((cx + 1) * w + grid - 1) // grid
    ry = y0 + y1 - 1 - y
    rx = x0 + x1 - 1 - x
    partner = lookup[(b * h + ry) * w + rx]
    if groups is not None:
        ok = partner >= 0
        ok[ok.clone()] = groups[partner[ok]] == groups[ok]
        partner = torch.where(ok, partner, torch.full_like(partner, -1))
    return partner


def sag_indices(
    groups: torch.Tensor,
    partners: torch.Tensor,
    k: int,
    *,
    replace: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SAG: k // 2 SG draws followed by their antithetic partners (`partners[i]`, same group, or -1).

    Output = cat(primaries, partners of the primaries[, one extra SG draw when k is odd]); position i and
    i + k // 2 form a pair. A primary without a valid partner is paired with itself: partner q is then
    still uniform over the group (q is reached from its reflection, or from itself when it has none),
    so the estimator stays unbiased when the group is not symmetric (class-restricted groups).
    """
    half = k // 2
    primaries = sg_indices(groups, half, replace=replace, generator=generator)
    mates = partners[primaries]
    mates = torch.where(mates >= 0, mates, primaries)
    parts = [primaries, mates]
    if k % 2:
        parts.append(sg_indices(groups, 1, replace=True, generator=generator))
    return torch.cat(parts)


def _square_side(n: int) -> int:
    """ceil(sqrt(n)), at least 1."""
    side = max(1, int(n**0.5))
    while side * side < n:
        side += 1
    while side > 1 and (side - 1) * (side - 1) >= n:
        side -= 1
    return side


def index_order_groups(n: int, cuts: int = 4, device: torch.device | str = "cpu") -> torch.Tensor:
    """The official ARCO code's grouping (`grid_monte_carlo_sample`): indices 0..n-1 laid out row-major on a
    ceil(sqrt(n)) square cut into `cuts` x `cuts` blocks; group = block. Only loosely spatial (candidate
    order), kept as `arco.sampler = index_order` for comparison with the code.
    """
    side = _square_side(n)
    i = torch.arange(n, device=device)
    return grid_cells(i // side, i % side, (side, side), cuts)


def index_order_partners(n: int, cuts: int = 4, device: torch.device | str = "cpu") -> torch.Tensor:
    """Antithetic partners for `index_order_groups`: reflection through the block centre in the square
    layout (the code's `grid_as_monte_carlo_sample`); -1 where the reflection falls past index n-1."""
    side = _square_side(n)
    i = torch.arange(n, device=device)
    zeros = torch.zeros_like(i)
    return reflection_partners(zeros, i // side, i % side, (1, side, side), cuts)
