"""ARCO's bounded state and pixel plumbing: FIFO queues, per-class banks, point-sampled features, CutMix.

Memory rule (design.md section 5): only *sampled* embeddings are ever stored, in fixed-size buffers on
the training device; representations are computed at sampled pixels only (never a full-resolution
C x H x W representation map, never a whole flattened map in a queue, unlike the official code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medcl_cli.methods.samplers import (
    grid_groups,
    index_order_groups,
    ns_indices,
    reflection_partners,
    sag_indices,
    sg_indices,
)

SAMPLERS = ("sg", "sag", "ns", "index_order")


class FifoQueue(nn.Module):
    """K x D ring buffer of L2-normalised embeddings; `valid()` = the entries pushed so far."""

    data: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("data", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        size = self.data.shape[0]
        x = x.detach()[-size:].to(self.data.dtype)
        n = x.shape[0]
        if n == 0:
            return
        idx = (self.ptr + torch.arange(n, device=x.device)) % size
        self.data[idx] = x
        self.ptr.copy_((self.ptr + n) % size)
        self.filled.copy_(torch.clamp(self.filled + n, max=size))

    def valid(self) -> torch.Tensor:
        """The entries pushed so far (all K once the queue has wrapped)."""
        return self.data[: int(self.filled)]


class ClassBank(nn.Module):
    """One FIFO bank per class of sampled teacher pixel embeddings, each with its grid cell (for SG)."""

    emb: torch.Tensor
    cell: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("emb", torch.zeros(num_classes, size, dim))
        self.register_buffer("cell", torch.zeros(num_classes, size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, emb: torch.Tensor, cls: torch.Tensor, cell: torch.Tensor) -> None:
        """Append embeddings (N x D) of classes `cls` (N) in grid cells `cell` (N); vectorised over classes."""
        k, size = self.emb.shape[:2]
        if emb.shape[0] == 0:
            return
        order = torch.argsort(cls, stable=True)
        cls, emb, cell = cls[order], emb.detach()[order].to(self.emb.dtype), cell[order]
        counts = torch.bincount(cls, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(cls.numel(), device=cls.device) - starts[cls]
        drop = torch.clamp(counts - size, min=0)  # only the last `size` of a class survive
        keep = rank >= drop[cls]
        cls, emb, cell, rank = cls[keep], emb[keep], cell[keep], (rank - drop[cls])[keep]
        pos = (self.ptr[cls] + rank) % size
        self.emb[cls, pos] = emb
        self.cell[cls, pos] = cell
        kept = torch.clamp(counts, max=size)
        self.ptr.copy_((self.ptr + kept) % size)
        self.filled.copy_(torch.clamp(self.filled + kept, max=size))

    def candidates(self, exclude: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Filled slots of every class but `exclude`: (flat slot ids M, class M, cell M); no embedding is
        copied until `take` reads the few the sampler picks."""
        k, size = self.emb.shape[:2]
        slot = torch.arange(size, device=self.emb.device)
        ok = slot[None, :] < self.filled[:, None]
        ok[exclude] = False
        flat = torch.nonzero(ok.flatten()).flatten()
        return flat, flat // size, self.cell.flatten()[flat]

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        return self.emb.flatten(0, 1)[flat]


def draw(
    kind: str,
    k: int,
    groups: torch.Tensor,
    partners: torch.Tensor | None,
    generator: torch.Generator | None,
    grid: int,
    replace: bool = False,
) -> torch.Tensor:
    """Indices of `k` candidates by sampler `kind` (sg | sag | ns | index_order; see samplers.py).

    `groups`: the paper's (class, cell) group of each candidate; `partners`: their point reflections
    (SAG), or None where candidates have no positions (bank entries: SAG falls back to SG there).
    """
    n = groups.numel()
    if not replace:
        k = min(k, n)
    if kind == "ns":
        return ns_indices(n, k, replace=replace, generator=generator, device=groups.device)
    if kind == "index_order":
        return sg_indices(index_order_groups(n, grid, groups.device), k, replace=replace, generator=generator)
    if kind == "sag" and partners is not None:
        return sag_indices(groups, partners, k, replace=replace, generator=generator)
    return sg_indices(groups, k, replace=replace, generator=generator)


def pixel_draw(
    kind: str, k: int, b: torch.Tensor, y: torch.Tensor, x: torch.Tensor, shape: tuple[int, int, int], grid: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Sampler over candidate pixels (b, y, x) of one class: groups = cells of the G x G image grid
    (index_order: blocks of the candidates' batch-row-column order, as the official code)."""
    groups = grid_groups(y, x, shape[1:], grid)
    partners = reflection_partners(b, y, x, shape, grid, groups) if kind == "sag" else None
    return draw(kind, k, groups, partners, generator, grid)


def point_features(
    feats: list[torch.Tensor], b: torch.Tensor, y: torch.Tensor, x: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """N x sum(C): each feature map bilinearly upsampled to `size` (align_corners=False, border clamp)
    and read at pixels (b, y, x) -- computed at those pixels only, equal to interpolating the whole map.
    Source coordinates and weights are computed in float32 whatever the maps' dtype: under bf16 autocast
    a pixel coordinate above 256 (or a fraction like 200.5) is not representable, so the corners and the
    weights would be wrong."""
    h_out, w_out = size
    n = b.numel()
    cols = []
    for f in feats:
        nb, c, h, w = f.shape
        coord = torch.float64 if f.dtype == torch.float64 else torch.float32
        sy = ((y.to(coord) + 0.5) * (h / h_out) - 0.5).clamp(0, h - 1)
        sx = ((x.to(coord) + 0.5) * (w / w_out) - 0.5).clamp(0, w - 1)
        y0, x0 = sy.floor().long(), sx.floor().long()
        y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
        wy, wx = (sy - y0.to(coord)).to(f.dtype), (sx - x0.to(coord)).to(f.dtype)
        # one gather of the four corners (one scatter in backward) from a channels-last copy of the map
        flat = f.permute(0, 2, 3, 1).reshape(nb * h * w, c)
        base = b * (h * w)
        pix = torch.cat([base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1])
        v = flat.index_select(0, pix).view(4, n, c)
        wy, wx = wy[:, None], wx[:, None]
        top = torch.addcmul(v[0] * (1 - wx), v[1], wx)
        bottom = torch.addcmul(v[2] * (1 - wx), v[3], wx)
        cols.append(torch.addcmul(top * (1 - wy), bottom, wy))
    return torch.cat(cols, dim=1)


def cutmix_sources(
    labeled: torch.Tensor, size: tuple[int, int], area: float, generator: torch.Generator | None
) -> torch.Tensor:
    """B x H x W long: the batch row each output pixel is copied from. Every unlabelled image gets a box of
    `area` x its size (random position) pasted from the next unlabelled image; labelled rows are untouched."""
    nb = labeled.shape[0]
    h, w = size
    dev = labeled.device
    src = torch.arange(nb, device=dev)[:, None, None].expand(nb, h, w).clone()
    unl = torch.nonzero(~labeled).flatten()
    if unl.numel() < 2 or area <= 0:
        return src
    partner = torch.roll(unl, 1)
    side = min(area, 1.0) ** 0.5
    bh, bw = max(1, round(h * side)), max(1, round(w * side))
    u = torch.rand(unl.numel(), 2, generator=generator, device=dev)
    y0 = (u[:, 0] * (h - bh + 1)).long()[:, None, None]
    x0 = (u[:, 1] * (w - bw + 1)).long()[:, None, None]
    yy = torch.arange(h, device=dev)[None, :, None]
    xx = torch.arange(w, device=dev)[None, None, :]
    box = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
    src[unl] = torch.where(box, partner[:, None, None], unl[:, None, None])
    return src


def gather_pixels(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """t (B x C x H x W or B x H x W) with pixel (b, p) taken from row src[b, p] at the same position."""
    squeeze = t.dim() == 3
    if squeeze:
        t = t.unsqueeze(1)
    nb, c, h, w = t.shape
    hw = h * w
    idx = (src.reshape(nb, hw) * hw + torch.arange(hw, device=t.device)).reshape(-1)
    out = t.permute(1, 0, 2, 3).reshape(c, nb * hw)[:, idx].reshape(c, nb, h, w).permute(1, 0, 2, 3)
    return out.squeeze(1) if squeeze else out
