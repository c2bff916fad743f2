"""semicl (Hu et al., MICCAI 2021): global then supervised local contrastive pretraining."""

from __future__ import annotations

import torch

from medcl_cli.methods.samplers import block_partition, stride_indices


def stride_pixels(
    feat: torch.Tensor, labels: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels of the downsampling mode: every `stride`-th pixel of every map, pooled.

    feat: M x C x (spatial) (M = views x images), labels: M x (spatial). Returns (N x C, N) with
    N = M x kept pixels per map: one pool, so positives span both views and all images.
    """
    idx = stride_indices(feat.shape[2:], stride, device=feat.device)
    z = feat.flatten(2)[:, :, idx]  # M x C x P
    lab = labels.flatten(1)[:, idx]  # M x P
    return z.permute(0, 2, 1).reshape(-1, feat.shape[1]), lab.reshape(-1)


def block_pixels(
    feat: torch.Tensor, labels: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels of the block-division mode: one group per spatial block that holds a foreground pixel.

    feat: M x C x (spatial), labels: M x (spatial). Returns (G x N x C, G x N), N = M x block pixels:
    block g of every map (both views, all images) in one group. Blocks whose labels are all background
    (or ignored) in every map are dropped here, before any head or loss work.
    """
    idx = block_partition(feat.shape[2:], block, device=feat.device)  # G x P
    g, p = idx.shape
    lab = labels.flatten(1)[:, idx]  # M x G x P
    keep = (lab > 0).any(dim=2).any(dim=0)  # G
    idx = idx[keep]
    lab = lab[:, keep].permute(1, 0, 2).reshape(idx.shape[0], -1)  # G' x (M P)
    z = feat.flatten(2)[:, :, idx]  # M x C x G' x P
    z = z.permute(2, 0, 3, 1).reshape(idx.shape[0], -1, feat.shape[1])  # G' x (M P) x C
    return z, lab
