"""The U-Net every method shares: returns the logits AND the encoder/decoder stage features.

Dense contrastive methods (GCL pixel loss, semicl local loss, PDCR, ARCO) need the decoder features and
global methods need the bottleneck, so `forward` returns `NetOut(logits, enc, dec)` instead of logits
only. `spatial_dims` picks Conv2d/Conv3d etc., so 3D needs no twin file. Layout follows the SSL4MIS /
ARCO U-Net (channels 16..256, two 3x3 conv-norm-LeakyReLU per stage, max-pool down, transposed-conv up).

Stage names: `enc0..encN` (enc0 full resolution, encN the bottleneck) and `dec0..dec{N-1}` (dec0 the
deepest decoder stage, dec{N-1} full resolution). A `UAFS` block (models/uafs.py, PDCR) can be inserted
after any named stage with `uafs_at`; it is imported only when asked for.

Hand-written rather than MONAI's `BasicUNet`: the methods need the stage features and the UAFS hook, and
it is measured faster, 0.82x the step time of a `BasicUNet` of the same widths and loss
(`benchmarks/speed.py`, docs/benchmarks.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medcl_cli.errors import UsageError

NORMS = ("batch", "instance", "group")


class NetOut(NamedTuple):
    """What the network returns: logits B x K x H x W, encoder stages (shallow to deep), decoder stages
    (deep to shallow; `dec[-1]` is full resolution)."""

    logits: torch.Tensor
    enc: list[torch.Tensor]
    dec: list[torch.Tensor]


def conv_cls(spatial_dims: int) -> Any:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[_check_dims(spatial_dims)]


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (1, 2, 3):
        raise UsageError(f"model.spatial_dims must be 1, 2 or 3, found {spatial_dims}", "use 2 for slices")
    return spatial_dims


def make_norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """BatchNorm / InstanceNorm (affine) / GroupNorm (up to 8 groups) for `spatial_dims`."""
    if norm == "batch":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels)
    if norm == "instance":
        return {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims](channels, affine=True)
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise UsageError(f"unknown model.norm '{norm}'", f"use one of {', '.join(NORMS)}")


class ConvBlock(nn.Sequential):
    """Two (conv 3 - norm - LeakyReLU) with dropout between them."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, norm: str, dropout: float) -> None:
        conv = conv_cls(spatial_dims)
        layers: list[nn.Module] = [
            conv(cin, cout, 3, padding=1, bias=False),
            make_norm(norm, spatial_dims, cout),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        if dropout > 0:
            layers.append({1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}[spatial_dims](dropout))
        layers += [
            conv(cout, cout, 3, padding=1, bias=False),
            make_norm(norm, spatial_dims, cout),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        super().__init__(*layers)


class UpBlock(nn.Module):
    """Transposed-conv x2 upsampling, concatenation with the skip, ConvBlock."""

    def __init__(self, spatial_dims: int, cin: int, cskip: int, cout: int, norm: str, dropout: float) -> None:
        super().__init__()
        tconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
        self.up = tconv(cin, cskip, 2, stride=2)
        self.block = ConvBlock(spatial_dims, 2 * cskip, cout, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[2:] != skip.shape[2:]:  # odd sizes: match the skip exactly
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.block(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net with `len(channels)` encoder stages; forward returns NetOut(logits, enc, dec)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        norm: str = "batch",
        dropout: float = 0.0,
        uafs_at: Sequence[str] = (),
    ) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or min(channels) < 1:
            raise UsageError(
                f"model.channels needs at least two positive widths, found {list(channels)}",
                "e.g. --set model.channels=[16,32,64,128,256]",
            )
        if norm not in NORMS:
            raise UsageError(f"unknown model.norm '{norm}'", f"use one of {', '.join(NORMS)}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"model.dropout must be in [0, 1), found {dropout}")
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.out_channels = out_channels
        n = len(channels) - 1
        self.stage_channels: dict[str, int] = {f"enc{i}": c for i, c in enumerate(channels)}
        self.stage_channels.update({f"dec{j}": channels[n - 1 - j] for j in range(n)})
        pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]
        self.pool = pool(2)
        self.encoder = nn.ModuleList(
            [ConvBlock(spatial_dims, in_channels, channels[0], norm, dropout)]
            + [ConvBlock(spatial_dims, channels[i - 1], channels[i], norm, dropout) for i in range(1, n + 1)]
        )
        self.decoder = nn.ModuleList(
            [
                UpBlock(spatial_dims, channels[n - j], channels[n - 1 - j], channels[n - 1 - j], norm, dropout)
                for j in range(n)
            ]
        )
        self.head = conv_cls(spatial_dims)(channels[0], out_channels, 1)
        self.uafs_at = tuple(uafs_at)
        self.uafs = nn.ModuleDict(self._build_uafs(self.uafs_at))

    def _build_uafs(self, names: tuple[str, ...]) -> dict[str, nn.Module]:
        if not names:
            return {}
        unknown = [s for s in names if s not in self.stage_channels]
        if unknown:
            from medcl_cli.errors import unknown_choice

            raise unknown_choice("model.uafs_at stage", unknown[0], self.stage_channels)
        try:
            uafs_mod = importlib.import_module("medcl_cli.models.uafs")
        except ModuleNotFoundError as exc:
            raise UsageError(
                "model.uafs_at is set but the UAFS block (medcl_cli/models/uafs.py) is not available",
                "remove model.uafs_at or update medcl",
            ) from exc
        block = uafs_mod.UAFS
        return {s: block(self.stage_channels[s]) for s in names}

    def _after(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.uafs[name](x) if name in self.uafs else x

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder stages only (enc0..encN), for global methods that never use the decoder."""
        enc: list[torch.Tensor] = []
        h = x
        for i, block in enumerate(self.encoder):
            if i > 0:
                h = self.pool(h)
            h = self._after(f"enc{i}", block(h))
            enc.append(h)
        return enc

    def forward(self, x: torch.Tensor) -> NetOut:
        enc = self.encode(x)
        h = enc[-1]
        dec: list[torch.Tensor] = []
        n = len(self.decoder)
        for j, up in enumerate(self.decoder):
            h = self._after(f"dec{j}", up(h, enc[n - 1 - j]))
            dec.append(h)
        return NetOut(self.head(h), enc, dec)


def build_unet(model_cfg: Any, num_classes: int) -> UNet:
    """The network of a `ModelConfig` (config.py) for `num_classes` output channels."""
    return UNet(
        spatial_dims=int(model_cfg.spatial_dims),
        in_channels=int(model_cfg.in_channels),
        out_channels=int(num_classes),
        channels=tuple(model_cfg.channels),
        norm=str(model_cfg.norm),
        dropout=float(model_cfg.dropout),
        uafs_at=tuple(model_cfg.uafs_at),
    )
