"""Projection heads the methods compose (no method owns a private copy).

- `GlobalHead`: global average pool -> Linear -> ReLU -> Linear (SimCLR / GCL image-level projection).
- `DenseHead`: 1x1 conv -> norm -> ReLU -> 1x1 conv, per pixel (GCL pixel head, semicl local head,
  ARCO / PDCR representation heads); keeps the spatial grid.
- `Predictor`: Linear -> BN -> ReLU -> Linear on embeddings (BYOL-style predictor, optional in methods).
"""

from __future__ import annotations

import torch
from torch import nn

from medcl_cli.models.unet import conv_cls


class GlobalHead(nn.Module):
    """B x C x (spatial) -> B x out: GAP, Linear, ReLU, Linear (not normalised; losses normalise)."""

    def __init__(self, in_channels: int, hidden: int = 256, out: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.flatten(2).mean(dim=2))


class DenseHead(nn.Module):
    """B x C x H x W -> B x out x H x W with 1x1 convolutions (norm: batch norm, `spatial_dims` aware)."""

    def __init__(self, in_channels: int, hidden: int = 256, out: int = 64, spatial_dims: int = 2) -> None:
        super().__init__()
        conv = conv_cls(spatial_dims)
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
        self.net = nn.Sequential(
            conv(in_channels, hidden, 1, bias=False), bn(hidden), nn.ReLU(inplace=True), conv(hidden, out, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Predictor(nn.Module):
    """B x D -> B x out: Linear, BatchNorm, ReLU, Linear."""

    def __init__(self, in_dim: int, hidden: int = 256, out: int | None = None) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out or in_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
