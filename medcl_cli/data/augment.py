"""Batched, on-device augmentation with tracked geometry, so dense methods can match pixels across views.

Every view k of a base slice is `warp(base, theta_k)`: `theta_k` (B x 2 x 3) is the affine of
`F.affine_grid` mapping output coordinates (normalised, align_corners=False) to base coordinates. So
`view_a(p) = base(theta_a p)` and a tensor on view a's grid (image, label, or a feature map at any
resolution) is put on view b's grid by `align(x, theta_a, theta_b) = warp(x, theta_a^-1 theta_b)`.
Pixels of b that fall outside a are zero (features) or -1 (labels); `overlap_mask` marks the valid ones.

Random parameters are drawn for the whole global batch from one generator and each DDP rank takes its
rows of that draw (`rows`), so a multi-process run sees exactly the augmentations of a single-process run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def _exact(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 (float64 stays): affines and sampling grids are never computed in half precision."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], dim=1)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """theta of `warp(warp(x, first), second)` (= first @ second in homogeneous form), in float32 even
    under autocast (a bf16 product of affines is off by about a pixel at 256 px)."""
    with torch.autocast(first.device.type, enabled=False):
        return torch.bmm(_homogeneous(_exact(first)), _homogeneous(_exact(second)))[:, :2]


def invert(theta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(_homogeneous(theta.double())).to(_exact(theta).dtype)[:, :2]


def identity(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.eye(2, 3, device=device).unsqueeze(0).repeat(batch, 1, 1)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear", padding: str = "zeros") -> torch.Tensor:
    """x (B x C x H x W, float) resampled at `theta` p for every output pixel p (same size), in x's dtype.

    The grid and the interpolation run in float32 with autocast off: a half-precision grid at 256 px
    misplaces samples by up to half a pixel, and autocast would otherwise decide the dtypes."""
    with torch.autocast(x.device.type, enabled=False):
        work = _exact(x)
        grid = F.affine_grid(_exact(theta).to(work.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(work, grid, mode=mode, padding_mode=padding, align_corners=False)
    return out.to(x.dtype)


def warp_labels(label: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Labels (B x H x W long, -1 = ignore) warped with nearest; -1 outside the source image."""
    shifted = (label + 1).unsqueeze(1).to(torch.float32)
    out = warp(shifted, theta.float(), mode="nearest", padding="zeros")
    return out.squeeze(1).round().long() - 1


def align(x: torch.Tensor, theta_from: torch.Tensor, theta_to: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """A tensor on view `from`'s grid mapped onto view `to`'s grid (features: B x C x h x w at any
    resolution; labels: B x H x W long, with nearest and -1 where unknown)."""
    rel = compose(invert(theta_from), theta_to)
    if x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return warp_labels(x.long(), rel)
    return warp(x, rel, mode=mode)


def overlap_mask(theta_from: torch.Tensor, theta_to: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x h x w bool: pixels of view `to` (at resolution `size`) that lie inside view `from`."""
    b = theta_to.shape[0]
    ones = torch.ones(b, 1, *size, device=theta_to.device)
    rel = compose(invert(theta_from), theta_to)
    return warp(ones, rel, mode="nearest").squeeze(1) > 0.5


def random_theta(n: int, cfg: Any, gen: torch.Generator) -> torch.Tensor:
    """n random affines (rotation, isotropic scale, translation, horizontal flip) on the CPU."""
    u = torch.rand(n, 5, generator=gen)
    angle = (u[:, 0] * 2 - 1) * math.radians(float(cfg.rotate_deg))
    scale = 1.0 + (u[:, 1] * 2 - 1) * float(cfg.scale)
    tx = (u[:, 2] * 2 - 1) * 2 * float(cfg.translate)
    ty = (u[:, 3] * 2 - 1) * 2 * float(cfg.translate)
    flip = torch.where(u[:, 4] < float(cfg.flip), -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    )
    return theta


def _blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    r = max(int(round(2 * sigma)), 1)
    k = torch.exp(-(torch.arange(-r, r + 1, device=x.device, dtype=x.dtype) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def intensity(x: torch.Tensor, cfg: Any, params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Contrast, brightness, gamma (on each channel's range), blur and noise, per channel: `params` is B x 5
    (every channel draws the same) or B x C x 5 (one draw per channel), in [0, 1). Statistics are taken per
    image and channel, so the sequences of a multi-channel slice keep their own scales."""
    b, c = x.shape[0], x.shape[1]
    dims = tuple(range(2, x.ndim))
    p = params.view(b, 1, 5).expand(b, c, 5) if params.ndim == 2 else params
    shape = (b, c) + (1,) * (x.ndim - 2)
    mean = x.mean(dim=dims, keepdim=True)
    contrast = (1.0 + (p[..., 0] * 2 - 1) * float(cfg.contrast)).reshape(shape)
    x = (x - mean) * contrast + mean + ((p[..., 1] * 2 - 1) * float(cfg.brightness)).reshape(shape)
    if float(cfg.gamma) > 0:
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        rng = (hi - lo).clamp_min(1e-6)
        g = torch.exp((p[..., 2] * 2 - 1) * float(cfg.gamma)).reshape(shape)
        x = ((x - lo) / rng).clamp(0, 1).pow(g) * rng + lo
    if float(cfg.blur_p) > 0:
        mask = (p[..., 3] < float(cfg.blur_p)).reshape(shape).to(x.dtype)
        x = mask * _blur(x) + (1 - mask) * x
    return x + noise * float(cfg.noise)


def make_views(
    batch: dict[str, Any], n_views: int, cfg: Any, generator: torch.Generator, rows: torch.Tensor | None = None,
    total: int | None = None,
) -> dict[str, Any]:
    """The batch plus `image{k}`, `label{k}`, `theta{k}` per view (k = "" for view 1, "2" for view 2).

    `generator` is a CPU generator; parameters are drawn for `total` samples (the global batch) and the
    batch's `rows` of that draw are used (default all), so DDP ranks reproduce a single-process run."""
    base, label = batch["image"], batch["label"]
    b, dev = base.shape[0], base.device
    total = total or b
    rows = torch.arange(b) if rows is None else rows.cpu()
    out = dict(batch)
    for v in range(n_views):
        key = "" if v == 0 else str(v + 1)
        theta_all = random_theta(total, cfg, generator)
        params_all = torch.rand(total, 5, generator=generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if base.shape[1] > 1:  # channels 1.. draw their own intensity parameters (one channel: the same stream)
            more = torch.rand(total, base.shape[1] - 1, 5, generator=generator)
            params_all = torch.cat([params_all.unsqueeze(1), more], dim=1)
        dgen = torch.Generator(device=dev).manual_seed(seed)
        noise_all = torch.randn((total, *base.shape[1:]), generator=dgen, device=dev, dtype=base.dtype)
        theta = theta_all[rows].to(dev)
        params = params_all[rows].to(dev)
        img = warp(base, theta, mode="bilinear", padding="border")
        out[f"image{key}"] = intensity(img, cfg, params, noise_all[rows.to(dev)])
        out[f"label{key}"] = warp_labels(label, theta)
        out[f"theta{key}"] = theta
    return out
