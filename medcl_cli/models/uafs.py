"""UAFS: the uncertainty-aware feature selection block of PDCR (Liu/Li et al., IEEE TMI 2022).

The TMI version calls it UAFR ("feature re-weighting"). A small branch predicts an M-way distribution per
pixel; its normalised entropy U (0 = confident, 1 = uniform) gates the features:

    A = softmax(F(x)) over M,   F = conv kxk (C -> hidden) -> norm -> ReLU -> conv 1x1 (-> M)
    U = -sum_m A_m log A_m / log M                  (in [0, 1])
    x' = x + x * (1 - U)                             (broadcast over channels)

so confident positions are amplified up to 2x and uncertain ones are passed through unchanged. The map has
no loss of its own: the official code leaves its targets empty and learns it through the segmentation loss
(methods.md section 3). Paper ablation: M = 2 and a 3x3 kernel are best; hidden = 16 in the 2D code (C/4 in
the 3D code).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medcl_cli.errors import UsageError

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class UAFS(nn.Module):
    """Uncertainty-aware feature selection: `forward(x) -> x + x * (1 - U)`, shape-preserving.

    `x` is B x C x *spatial. After each forward, `self.uncertainty` holds the detached map U
    (B x 1 x *spatial) for inspection; `forward_with_uncertainty` returns it with gradients.
    """

    def __init__(self, channels: int, m: int = 2, hidden: int = 16, kernel: int = 3, spatial_dims: int = 2) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise UsageError(f"UAFS: spatial_dims must be 1, 2 or 3, found {spatial_dims}", "use 2 for slices")
        if m < 2:
            raise UsageError(f"UAFS: m (branches) must be >= 2 for a normalised entropy, found {m}", "paper: m=2")
        if kernel < 1 or kernel % 2 == 0:
            raise UsageError(f"UAFS: kernel must be a positive odd size, found {kernel}", "paper: 3")
        if channels < 1 or hidden < 1:
            raise UsageError(f"UAFS: channels and hidden must be positive, found {channels}, {hidden}", "check widths")
        conv = _CONV[spatial_dims]
        self.m = int(m)
        self.branch = nn.Sequential(
            conv(channels, hidden, kernel, padding=kernel // 2, bias=False),
            _BN[spatial_dims](hidden),
            nn.ReLU(inplace=True),
            conv(hidden, self.m, 1),
        )
        self.uncertainty: torch.Tensor | None = None

    def forward_with_uncertainty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x + x * (1 - U), U)` with U the normalised entropy map, B x 1 x *spatial."""
        logits = self.branch(x).float()
        log_a = torch.log_softmax(logits, dim=1)
        u = -(log_a.exp() * log_a).sum(dim=1, keepdim=True) / math.log(self.m)
        u = u.clamp(0.0, 1.0).to(x.dtype)
        return x * (2.0 - u), u  # = x + x * (1 - U), one broadcast multiply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, u = self.forward_with_uncertainty(x)
        self.uncertainty = u.detach()
        return out
