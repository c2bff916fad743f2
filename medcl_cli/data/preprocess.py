"""The one preprocessing path shared by training, evaluation and prediction.

A volume (z, y, x) is normalised per volume, then each z-slice is brought to `size x size` either by
resizing (bilinear for images, nearest for labels) or by centred pad/crop. `PrepInfo` remembers what
was done so model outputs go back to the exact original slice grid (`logits_to_volume`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medcl_cli.errors import InvalidDataError, UsageError

NORMALIZE_MODES = ("zscore", "minmax", "percentile")
RESIZE_MODES = ("resize", "pad_crop")


@dataclass(frozen=True)
class PrepInfo:
    """How a volume was turned into model slices, to undo it exactly."""

    size: int  # model slice size (square)
    mode: str  # resize | pad_crop
    shape_yx: tuple[int, int]  # original slice shape


def normalize_volume(array: np.ndarray, mode: str = "zscore") -> np.ndarray:
    """Per-volume intensity normalisation to float32; non-finite voxels are an error (named)."""
    if mode not in NORMALIZE_MODES:
        raise UsageError(f"unknown normalisation '{mode}'", f"use one of {', '.join(NORMALIZE_MODES)}")
    a = np.asarray(array, dtype=np.float32)
    if not np.isfinite(a).all():
        n = int((~np.isfinite(a)).sum())
        raise InvalidDataError(
            f"volume has {n} NaN or infinite voxels", "fix or mask them before training (medcl validate lists them)"
        )
    if mode == "zscore":
        std = float(a.std())
        return (a - float(a.mean())) / (std if std > 1e-8 else 1.0)
    if mode == "percentile":
        lo, hi = np.percentile(a, [0.5, 99.5])
        a = np.clip(a, lo, hi)
    else:
        lo, hi = float(a.min()), float(a.max())
    rng = float(hi - lo)
    return (a - float(lo)) / (rng if rng > 1e-8 else 1.0)


def _pad_crop(t: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """Centred pad (with `fill`) and/or crop of the last two dims to size x size."""
    h, w = t.shape[-2:]
    out = t.new_full((*t.shape[:-2], size, size), fill)
    sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)  # crop start in the source
    dy, dx = max(0, (size - h) // 2), max(0, (size - w) // 2)  # paste start in the target
    ch, cw = min(h, size), min(w, size)
    out[..., dy : dy + ch, dx : dx + cw] = t[..., sy : sy + ch, sx : sx + cw]
    return out


def _undo_pad_crop(t: torch.Tensor, shape_yx: tuple[int, int], fill: float) -> torch.Tensor:
    h, w = shape_yx
    size = t.shape[-1]
    out = t.new_full((*t.shape[:-2], h, w), fill)
    sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)
    dy, dx = max(0, (size - h) // 2), max(0, (size - w) // 2)
    ch, cw = min(h, size), min(w, size)
    out[..., sy : sy + ch, sx : sx + cw] = t[..., dy : dy + ch, dx : dx + cw]
    return out


def image_slices(volume_zyx: np.ndarray, size: int, resize: str = "resize", normalize: str = "zscore") -> tuple[torch.Tensor, PrepInfo]:
    """Normalised volume as model input: Z x 1 x size x size float32, plus how to undo it."""
    if resize not in RESIZE_MODES:
        raise UsageError(f"unknown resize mode '{resize}'", f"use one of {', '.join(RESIZE_MODES)}")
    if volume_zyx.ndim != 3:
        raise InvalidDataError(f"expected a 3D volume, found {volume_zyx.ndim} dimensions")
    a = torch.from_numpy(normalize_volume(volume_zyx, normalize)).unsqueeze(1)
    info = PrepInfo(size=size, mode=resize, shape_yx=(int(a.shape[-2]), int(a.shape[-1])))
    if resize == "resize":
        if a.shape[-2:] != (size, size):
            a = F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    else:
        a = _pad_crop(a, size, float(a.min()) if a.numel() else 0.0)
    return a.contiguous(), info


def channel_slices(volume_czyx: np.ndarray, size: int, resize: str = "resize", normalize: str = "zscore"
                   ) -> tuple[torch.Tensor, PrepInfo]:
    """A (C, z, y, x) multi-channel volume as model input: Z x C x size x size, each channel normalised on
    its own (MR sequences have unrelated intensity scales); a (z, y, x) volume is one channel."""
    if volume_czyx.ndim == 3:
        return image_slices(volume_czyx, size, resize, normalize)
    if volume_czyx.ndim != 4:
        raise InvalidDataError(f"expected a (channels, z, y, x) volume, found {volume_czyx.ndim} dimensions")
    parts = [image_slices(np.ascontiguousarray(v), size, resize, normalize) for v in volume_czyx]
    return torch.cat([p[0] for p in parts], dim=1).contiguous(), parts[0][1]


def label_slices(label_zyx: np.ndarray, info: PrepInfo) -> torch.Tensor:
    """Labels on the model grid: Z x size x size int64 (nearest for resize, 0-padding for pad_crop)."""
    lab = torch.from_numpy(np.asarray(label_zyx).astype(np.int64))
    if info.mode == "resize":
        if tuple(lab.shape[-2:]) != (info.size, info.size):
            lab = F.interpolate(lab.unsqueeze(1).float(), size=(info.size, info.size), mode="nearest-exact")
            lab = lab.squeeze(1).long()
        return lab
    return _pad_crop(lab, info.size, 0)


def logits_to_volume(logits: torch.Tensor, info: PrepInfo) -> torch.Tensor:
    """Model outputs Z x K x size x size back to the original slice grid: Z x K x Y x X (same dtype)."""
    if info.mode == "resize":
        if tuple(logits.shape[-2:]) == info.shape_yx:
            return logits
        return F.interpolate(logits, size=info.shape_yx, mode="bilinear", align_corners=False)
    return _undo_pad_crop(logits, info.shape_yx, 0.0)
