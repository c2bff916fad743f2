"""SimCLR: global NT-Xent on two augmented views of every slice, the plain contrastive baseline.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020. Here the encoder is the U-Net's (decoder unused), the representation is
the globally pooled bottleneck and the projection head is an MLP (`GlobalHead`); the loss sees every
slice of the global batch (embeddings gathered across DDP ranks with gradients).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medcl_cli.core.collectives import gather_with_grad
from medcl_cli.errors import UsageError
from medcl_cli.methods.losses.contrastive import nt_xent
from medcl_cli.methods.precision import in_float32
from medcl_cli.models.heads import GlobalHead
from medcl_cli.models.unet import UNet


class SimCLR(nn.Module):
    """Pooled bottleneck -> projection MLP -> NT-Xent between the two views of each slice."""

    n_views = 2
    needs = {"unlabeled"}
    net: UNet  # the concrete U-Net: heads read its stage_channels / spatial_dims, steps call encode

    def __init__(self, net: UNet, cfg: Any, spec: Any) -> None:
        super().__init__()
        c = cfg.simclr
        if c.temperature <= 0:
            raise UsageError(f"simclr.temperature must be > 0, found {c.temperature}")
        self.net = net
        self.tau = float(c.temperature)
        channels = net.stage_channels[f"enc{len(net.channels) - 1}"]
        self.head = GlobalHead(channels, c.proj_hidden, c.proj_dim)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        b = batch["image"].shape[0]
        feat = self.net.encode(torch.cat([batch["image"], batch["image2"]]))[-1]
        z = F.normalize(self.head(feat), dim=1)
        z1, z2 = gather_with_grad(z[:b]), gather_with_grad(z[b:])
        return {"loss": in_float32(nt_xent)(z1, z2, self.tau)}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.training_step(batch)
