"""pdcr (Liu, Li et al., IEEE TMI 2022): patch-dragsaw contrastive regularisation of hidden features.

A fully supervised, single-stage objective: the Dice + cross-entropy of the `supervised` baseline (same
function, weights from `cfg.supervised`) plus PDCR terms on the raw hidden feature maps of chosen encoder
and decoder stages, plus a cross-layer term between two stages after 1x1 channel-adjusting convs
[methods.md section 3]. There is no projection head. The UAFS block lives in the network (`model.uafs_at`,
set by templates/pdcr.yaml), not here.

Per stage: feature positions on a regular grid away from the border (samplers.grid_positions, so at most
`*_samples` vectors per image and their square of pairs); each position's receptive-field centre in the
input; the foreground ratios of the mask around it, either patches of 5, 7, 9 input pixels (H-PDCR, the
paper's better variant) or the stage's receptive field (RF-PDCR); the affinity-weighted contrastive loss
over all pairs of an image (losses.affinity_contrast). Choices where paper and code disagree:
- the loss follows the official 3D code (affinity in the numerator, divergence in the denominator, tau
  0.5, mean reduction); the 2D code's swapped weights would pull dissimilar patches together;
- ratios are divided by the full patch area (pixels outside the image count as background), as in the code;
- "one loss per patch size" (paper default) or `combine: average` (ratios averaged first);
- the paper's "patch position encoding" is not in the released code and is not implemented.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from medcl_cli.core.protocol import DataSpec
from medcl_cli.errors import UsageError, unknown_choice
from medcl_cli.methods.losses.patch_contrast import affinity_contrast, foreground_ratios
from medcl_cli.methods.losses.segmentation import dice_ce_parts
from medcl_cli.methods.precision import in_float32
from medcl_cli.methods.samplers import grid_positions

PATCHES = ("hierarchical", "rf")
COMBINE = ("per_size", "average")


def unet_receptive_fields(depth: int) -> dict[str, int]:
    """Receptive-field side (input pixels) of every stage of models/unet.py's U-Net with `depth` stages.

    Each ConvBlock is two 3x3 convs (+2 jump each), max-pool 2 adds one jump and doubles it, the 2x2
    stride-2 transposed conv maps each output pixel to one input pixel (halves the jump), and the skip's
    field lies inside the upsampled path's. Exact for encoder stages; for decoder stages it is the field
    averaged over positions (the transposed convs make it alternate by a few pixels). Checked against a
    gradient probe in tests/test_pdcr.py.
    """
    rf, jump = 1, 1
    out: dict[str, int] = {}
    for i in range(depth):
        if i > 0:
            rf, jump = rf + jump, jump * 2
        rf += 4 * jump
        out[f"enc{i}"] = rf
    for j in range(depth - 1):
        jump //= 2
        rf += 4 * jump
        out[f"dec{j}"] = rf
    return out


class PDCR(nn.Module):
    """Dice + CE + lambda_enc PDCR(encoder stages) + lambda_dec PDCR(decoder stages) + lambda_x cross-layer."""

    n_views = 1
    needs = {"labeled"}

    def __init__(self, net: nn.Module, cfg: Any, spec: DataSpec) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg.pdcr
        self.seg_cfg = cfg.supervised
        self.num_classes = int(spec.num_classes)
        c = self.cfg
        stages: dict[str, int] = dict(getattr(net, "stage_channels", {}))
        for name in (*c.enc_stages, *c.dec_stages, *c.cross_stages):
            if name not in stages:
                raise unknown_choice("pdcr stage", name, stages)
        if c.patches not in PATCHES:
            raise unknown_choice("pdcr.patches mode", c.patches, PATCHES)
        if c.combine not in COMBINE:
            raise unknown_choice("pdcr.combine mode", c.combine, COMBINE)
        if not c.patch_sizes or any(k < 1 or k % 2 == 0 for k in c.patch_sizes):
            raise UsageError(
                f"pdcr.patch_sizes must be positive odd sides, found {list(c.patch_sizes)}",
                "paper: --set pdcr.patch_sizes=[5,7,9]",
            )
        counts = (c.enc_samples, c.dec_samples, c.cross_samples, c.cross_channels)
        if min(counts) < 1 or c.temperature <= 0 or c.border < 0:
            raise UsageError(
                "pdcr.*_samples and pdcr.cross_channels must be >= 1, pdcr.temperature > 0, pdcr.border >= 0",
                "paper values: enc_samples 64, dec_samples 32, cross_samples 32, temperature 0.5",
            )
        if len(dict.fromkeys(c.cross_stages)) == 1:
            raise UsageError(
                f"pdcr.cross_stages needs two or more stages, found {list(c.cross_stages)}",
                "e.g. --set pdcr.cross_stages=[enc2,enc3], or [] to switch the cross-layer term off",
            )
        if self.num_classes < 2:
            raise UsageError(f"pdcr needs a foreground class, found {self.num_classes} class(es)")
        # 1x1 convs to a common width, applied to the sampled vectors only (a 1x1 conv is a per-vector Linear)
        self.adjust = nn.ModuleDict(
            {s: nn.Linear(stages[s], c.cross_channels) for s in dict.fromkeys(c.cross_stages)}
        )
        depth = len(getattr(net, "channels", ())) or 1 + max(int(s[3:]) for s in stages if s.startswith("enc"))
        self.receptive_fields = unet_receptive_fields(depth)
        self._grids: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ---- sampling -------------------------------------------------------------------------------

    def _grid(
        self, name: str, fshape: torch.Size, ishape: torch.Size, n: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat indices N, input centres N x D, patch sides P x N) of a stage; cached per shape."""
        key = (name, tuple(fshape), tuple(ishape), n, str(device))
        if key not in self._grids:
            scale = [i / f for i, f in zip(ishape, fshape)]
            if self.cfg.patches == "rf":
                sides = [self.receptive_fields[name]]
                border = self.cfg.border
            else:
                sides = list(self.cfg.patch_sizes)
                border = max(self.cfg.border, math.ceil((max(sides) // 2) / min(scale)))
            idx = grid_positions(fshape, n, border)  # built once on the CPU (float64 is not on every device)
            coords = torch.stack(torch.unravel_index(idx, tuple(fshape)), dim=-1)
            centres = ((coords.double() + 0.5) * torch.tensor(scale, dtype=torch.float64)).long()
            size = torch.tensor(sides)[:, None].expand(-1, idx.numel())
            self._grids[key] = (idx.to(device), centres.to(device), size.to(device))
        return self._grids[key]

    def _sample(
        self, name: str, feat: torch.Tensor, label: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled vectors B x N x C and their foreground ratios B x P x N x (K-1) (P = 1 when averaged)."""
        idx, centres, sides = self._grid(name, feat.shape[2:], label.shape[1:], n, feat.device)
        vectors = feat.flatten(2)[:, :, idx].transpose(1, 2)
        rho = foreground_ratios(label, centres, sides, self.num_classes)
        if self.cfg.combine == "average":
            rho = rho.mean(dim=1, keepdim=True)
        return vectors, rho

    # ---- losses ---------------------------------------------------------------------------------

    def _layer_term(
        self, names: tuple[str, ...], feats: dict[str, torch.Tensor], label: torch.Tensor, n: int
    ) -> torch.Tensor:
        terms = []
        for name in names:  # a handful of configured stages, each fully vectorised
            v, rho = self._sample(name, feats[name], label, n)
            terms.append(in_float32(affinity_contrast)(v[:, None], rho, tau=self.cfg.temperature))
        return torch.stack(terms).mean()

    def _cross_term(self, feats: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        n = self.cfg.cross_samples
        sampled = {}
        for name in dict.fromkeys(self.cfg.cross_stages):
            v, rho = self._sample(name, feats[name], label, n)
            sampled[name] = (self.adjust[name](v), rho)
        terms = []
        for a, b in itertools.combinations(dict.fromkeys(self.cfg.cross_stages), 2):
            (qa, ra), (kb, rb) = sampled[a], sampled[b]
            terms.append(in_float32(affinity_contrast)(qa[:, None], ra, kb[:, None], rb, tau=self.cfg.temperature))
        return torch.stack(terms).mean()

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, label = batch["image"], batch["label"]
        labeled = batch.get("labeled")
        if labeled is not None and not bool(labeled.all()):
            if not bool(labeled.any()):  # nothing to learn from: a zero loss that still reaches every parameter
                zero = torch.stack([p.sum() for p in self.parameters()]).sum() * 0.0
                return {"loss": zero}
            image, label = image[labeled], label[labeled]  # an unlabelled mask would read as all background
        out = self.net(image)
        dice, ce = dice_ce_parts(out.logits, label)
        loss = self.seg_cfg.dice_weight * dice + self.seg_cfg.ce_weight * ce
        feats = {f"enc{i}": f for i, f in enumerate(out.enc)}
        feats.update({f"dec{j}": f for j, f in enumerate(out.dec)})
        c = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if c.enc_stages and c.enc_weight:
            terms["pdcr_enc"] = self._layer_term(c.enc_stages, feats, label, c.enc_samples)
            loss = loss + c.enc_weight * terms["pdcr_enc"]
        if c.dec_stages and c.dec_weight:
            terms["pdcr_dec"] = self._layer_term(c.dec_stages, feats, label, c.dec_samples)
            loss = loss + c.dec_weight * terms["pdcr_dec"]
        if c.cross_stages and c.cross_weight:
            terms["pdcr_cross"] = self._cross_term(feats, label)
            loss = loss + c.cross_weight * terms["pdcr_cross"]
        logged = {"dice": dice, "ce": ce, **terms}
        return {"loss": loss, **{k: v.detach() for k, v in logged.items()}}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.training_step(batch)
