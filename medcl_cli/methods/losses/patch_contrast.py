"""PDCR's patch-dragsaw contrastive regularisation (Liu/Li et al., IEEE TMI 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def foreground_ratios(
    label: torch.Tensor, centres: torch.Tensor, sizes: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Foreground composition of square/cubic patches of the mask around given centres (PDCR's descriptor).

    label: long B x *S (class per pixel; negative = ignore, counted as background); centres: long N x D
    input coordinates; sizes: long P or P x N odd patch sides (P patch series, per centre when P x N).
    Returns float B x P x N x (num_classes - 1): the fraction of the k^D patch covered by each foreground
    class 1..K-1. Pixels outside the image count as background and the divisor is always k^D, as in the
    official 3D code (and as `avg_pool2d(one_hot, k, stride=1, padding=k//2)` gathered at the centres).

    Computed from a summed-area table of the one-hot mask: one cumsum pass, then one gather of the 2^D box
    corners for every patch size and centre at once, so the cost does not grow with the patch size (the
    receptive fields of RF-PDCR reach 140 px) and there is no loop over points or sizes. Counts are integers,
    so the result is exact.
    """
    dims = label.dim() - 1
    spatial = label.shape[1:]
    if centres.dim() != 2 or centres.shape[1] != dims:
        raise ValueError(f"centres must be N x {dims}, found {tuple(centres.shape)}")
    b = label.shape[0]
    classes = torch.arange(1, num_classes, device=label.device).view(1, -1, *([1] * dims))
    onehot = (label.unsqueeze(1) == classes).to(torch.int32)  # B x F x *S
    table = F.pad(onehot, (1, 0) * dims)  # a zero row/column in front of every axis
    for d in range(dims):
        table = table.cumsum(dim=2 + d, dtype=torch.int32)
    sizes = sizes.to(device=label.device, dtype=torch.long)
    if sizes.dim() == 1:
        sizes = sizes[:, None].expand(-1, centres.shape[0])  # P x N
    half = (sizes // 2)[..., None]  # P x N x 1
    c = centres.to(label.device, torch.long)[None]  # 1 x N x D
    limit = torch.tensor(spatial, device=label.device)
    lo = torch.minimum(torch.clamp(c - half, min=0), limit)  # table index of the pixel before the box
    hi = torch.minimum(torch.clamp(c + half + 1, min=0), limit)  # table index of the last pixel in the box
    bits = torch.cartesian_prod(*[torch.tensor([0, 1], device=label.device)] * dims).view(-1, dims)  # 2^D x D
    corner = torch.where(bits[:, None, None, :].bool(), hi[None], lo[None])  # 2^D x P x N x D
    sign = 1 - 2 * ((dims - bits.sum(1)) % 2)  # + for an even number of `lo` coordinates
    ext = torch.tensor([s + 1 for s in spatial], device=label.device)  # the table's spatial shape
    strides = torch.cat([ext.flip(0).cumprod(0).flip(0)[1:], ext.new_ones(1)])  # row-major strides
    flat = (corner * strides).sum(-1)  # 2^D x P x N
    vals = table.flatten(2).gather(2, flat.reshape(1, 1, -1).expand(b, table.shape[1], -1))
    vals = vals.view(b, table.shape[1], *flat.shape)  # B x F x 2^D x P x N
    counts = (vals * sign.view(1, 1, -1, 1, 1)).sum(2)  # B x F x P x N
    area = sizes.to(torch.float32) ** dims  # P x N
    return (counts.to(torch.float32) / area).permute(0, 2, 3, 1)


def affinity_contrast(
    q: torch.Tensor,
    rho_q: torch.Tensor,
    k: torch.Tensor | None = None,
    rho_k: torch.Tensor | None = None,
    tau: float = 0.5,
) -> torch.Tensor:
    """PDCR's affinity-weighted contrastive loss (patch-dragsaw), 3D-code convention [methods.md section 3].

    q: ... x N x C feature vectors (raw: cosine similarity normalises them); rho_q: ... x N x F foreground
    ratios; k, rho_k: ... x M x C and ... x M x F for the cross-layer term (default: q, rho_q, i.e. all pairs
    of one layer, self-pairs included). Leading dims broadcast, e.g. q B x 1 x N x C against rho
    B x P x N x F gives one loss per patch size; the result is the mean over everything:

        s = cos(q_i, k_j) / tau,  s~ = s - max(s) (one global max, detached),
        a_ij = 1 - ||rho_i - rho_j||_1,  d_ij = 1 - a_ij,
        L = -mean_{i,j} log[ exp(s~_ij a_ij) / sum_k exp(s~_ik d_ik) ].

    With s~ <= 0 a large affinity rewards similarity (tug) and a large divergence penalises it (repulse).
    The official 2D code swaps a and d (with tau 1 and sum reduction), which pulls dissimilar patches
    together; we follow the 3D code. The max shift changes the objective (it is not only a stabiliser), so
    it is kept exactly.
    """
    if k is None:
        k, rho_k = q, rho_q
    elif rho_k is None:
        raise ValueError("affinity_contrast: rho_k is required when k is given")
    assert rho_k is not None
    qn = F.normalize(q.float(), dim=-1)
    kn = F.normalize(k.float(), dim=-1)
    s = qn @ kn.transpose(-1, -2) / tau  # ... x N x M
    s = s - s.max().detach()
    d = (rho_q.float().unsqueeze(-2) - rho_k.float().unsqueeze(-3)).abs().sum(-1)  # ... x N x M
    s, d = torch.broadcast_tensors(s, d)
    log_prob = s * (1.0 - d) - torch.logsumexp(s * d, dim=-1, keepdim=True)
    return -log_prob.mean()
