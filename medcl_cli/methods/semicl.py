"""semicl: semi-supervised contrastive pretraining, global then supervised local (Hu et al., MICCAI 2021).

Hu, Zeng, Xu, Shi, "Semi-supervised Contrastive Learning for Label-efficient Medical Image
Segmentation", MICCAI 2021, arXiv 2109.07407 (docs/methods.md section 2). Two stages, one fit loop:

- global (steps 0 .. switch-1): NT-Xent between two augmented views of every training slice, no masks,
  on the pooled bottleneck (`enc[-1]`) through a projection head. The head is trained (the authors'
  code leaves its MLP out of the optimiser, a bug we do not copy). The decoder is not run.
- local (steps switch .. end): the supervised local contrastive loss on the full-resolution decoder map
  (`dec[-1]`) through a 1x1-conv dense head, on the labelled slices of each batch only: anchors are the
  non-background pixels, positives every pixel of the same class in both views and all images, the
  background only a negative. The pairs are bounded by `semicl.mode`: `stride` keeps every s-th pixel
  (one pool), `block` compares pixels only inside the same b x b block (all-background blocks skipped).
  The dense head runs on the kept pixels only (a 1x1 conv commutes with picking pixels).

The stage is a function of the step: `switch = round(global_fraction * train.steps)` when both stages
run. The method counts finished steps in a buffer (`steps_done`, part of `method_state`), so a resumed
run continues in the right stage. When the stage changes, the parameters of the other stage (global head
in the local stage; decoder and dense head in the global stage; the segmentation head always) get
`requires_grad = False`: they receive no gradient, the optimiser skips them (no weight decay or momentum
drift) and the DDP gradient all-reduce leaves them out. `trained_parameters()` lists what a stage trains.

Views of the local stage keep pixel correspondence. `views: intensity` (the code's "supcon" mode, the
default) draws two intensity-only views of the base slice (brightness, contrast, gamma, noise of
`augment`, geometry off) from a generator seeded by (train.seed, step): reproducible and resumable;
labels are the base labels. `views: geometric` uses the loop's two geometric views and maps each view's
features back onto the base grid with `data.augment.align` (inverse affine); pixels a view does not
cover are ignored (label -1).

Loss form (`loss_form`): `code` (default) or `paper`, see `losses.local_supcon_terms`: the code form is
what produced the published numbers, is the well-behaved SupCon L_out, and is defined for one-class
blocks. Under DDP the global loss gathers every rank's embeddings; the local loss pairs pixels within
each rank's share of the labelled slices (the paper's local batch is 4 slices).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medcl_cli.core.collectives import gather_with_grad
from medcl_cli.data.augment import align, identity, make_views, overlap_mask
from medcl_cli.errors import UsageError
from medcl_cli.methods.losses.contrastive import LOCAL_FORMS, nt_xent
from medcl_cli.methods.losses.local_contrast import local_supcon_parts
from medcl_cli.methods.precision import in_float32
from medcl_cli.methods.samplers import block_partition, stride_indices
from medcl_cli.models.heads import DenseHead, GlobalHead
from medcl_cli.models.unet import UNet

STAGES = ("global", "local")
MODES = ("stride", "block")
VIEWS = ("intensity", "geometric")


def stride_pixels(feat: torch.Tensor, labels: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels of the downsampling mode: every `stride`-th pixel of every map, pooled.

    feat: M x C x (spatial) (M = views x images), labels: M x (spatial). Returns (N x C, N) with
    N = M x kept pixels per map: one pool, so positives span both views and all images.
    """
    idx = stride_indices(feat.shape[2:], stride, device=feat.device)
    z = feat.flatten(2)[:, :, idx]  # M x C x P
    lab = labels.flatten(1)[:, idx]  # M x P
    return z.permute(0, 2, 1).reshape(-1, feat.shape[1]), lab.reshape(-1)


def block_pixels(feat: torch.Tensor, labels: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels of the block-division mode: one group per spatial block that holds a foreground pixel.

    feat: M x C x (spatial), labels: M x (spatial). Returns (G x N x C, G x N), N = M x block pixels:
    block g of every map (both views, all images) in one group. Blocks whose labels are background (or
    ignored) in every map are dropped here, before any head or loss work.
    """
    idx = block_partition(feat.shape[2:], block, device=feat.device)  # G x P
    lab = labels.flatten(1)[:, idx]  # M x G x P
    keep = (lab > 0).any(dim=2).any(dim=0)  # G
    idx = idx[keep]
    g, n = idx.shape[0], labels.shape[0] * idx.shape[1]
    lab = lab[:, keep].permute(1, 0, 2).reshape(g, n)  # G' x (M P)
    z = feat.flatten(2)[:, :, idx]  # M x C x G' x P
    z = z.permute(2, 0, 3, 1).reshape(g, n, feat.shape[1])  # G' x (M P) x C
    return z, lab


def _global_units(units: torch.Tensor) -> torch.Tensor:
    """The divisor that makes the DDP average of the ranks' local losses the mean over every rank's units
    (anchors or blocks): units_all / world. Ranks hold different numbers of labelled slices (the sampler
    puts them first in the global batch), so a plain per-rank mean would weight them wrongly."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return units.clamp(min=1)
    total = units.detach().to(torch.float64).reshape(1).clone()
    dist.all_reduce(total)
    return (total[0] / dist.get_world_size()).clamp(min=1e-12)


def check_config(c: Any, image_size: int) -> None:
    """Validate the `semicl` section before any work (errors name the key and the fix)."""
    stages = tuple(c.stages)
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        raise UsageError(
            f"semicl.stages must name global and/or local once each, found {list(stages)}",
            "e.g. --set semicl.stages=[global,local] (or [local] for the paper's local-only variant)",
        )
    if stages == ("local", "global"):
        raise UsageError("semicl.stages runs global before local", "use --set semicl.stages=[global,local]")
    if len(stages) == 2 and not 0.0 < float(c.global_fraction) < 1.0:
        raise UsageError(f"semicl.global_fraction must be in (0, 1), found {c.global_fraction}")
    for key in ("global_temperature", "local_temperature"):
        if float(getattr(c, key)) <= 0:
            raise UsageError(f"semicl.{key} must be > 0, found {getattr(c, key)}")
    for key, allowed in (("mode", MODES), ("loss_form", LOCAL_FORMS), ("views", VIEWS)):
        if getattr(c, key) not in allowed:
            raise UsageError(f"semicl.{key} must be one of {', '.join(allowed)}, found '{getattr(c, key)}'")
    if int(c.stride) < 1:
        raise UsageError(f"semicl.stride must be >= 1, found {c.stride}")
    if not 1 <= int(c.block_size) <= image_size:
        raise UsageError(
            f"semicl.block_size must be in [1, data.image_size = {image_size}], found {c.block_size}",
            "the paper uses 16 x 16 blocks: --set semicl.block_size=16",
        )
    if int(c.pair_chunk) < 1:
        raise UsageError(f"semicl.pair_chunk must be >= 1, found {c.pair_chunk}")


class SemiCL(nn.Module):
    """Global NT-Xent, then supervised local contrast on the labelled slices, switching at a step."""

    n_views = 2
    net: UNet  # the concrete U-Net: heads read its stage_channels / spatial_dims, steps call encode
    steps_done: torch.Tensor  # a registered buffer (saved in method_state, so resume keeps the stage)
    # pretraining never trains the segmentation head, so a validation Dice during it measures a random
    # head; a loop that reads this flag skips validation (and so never writes a best.pt picked by chance)
    validates = False

    def __init__(self, net: UNet, cfg: Any, spec: Any) -> None:
        super().__init__()
        c = cfg.semicl
        check_config(c, int(cfg.data.image_size))
        self.net = net
        self.stages = tuple(c.stages)
        steps = int(cfg.train.steps)
        if self.stages == STAGES:
            self.switch = min(max(int(round(float(c.global_fraction) * steps)), 1), max(steps - 1, 1))
        else:
            self.switch = steps if self.stages == ("global",) else 0
        # global alone: every training slice; local alone: labelled slices; both: a labelled/unlabelled mix
        # (train.labeled_fraction_per_batch), the global stage using all of it, the local stage its labelled part
        if self.stages == ("global",):
            self.needs = {"unlabeled"}
        elif self.stages == ("local",):
            self.needs = {"labeled"}
        else:
            self.needs = {"labeled", "unlabeled"}
        self.global_tau, self.local_tau = float(c.global_temperature), float(c.local_temperature)
        self.mode, self.stride, self.block = str(c.mode), int(c.stride), int(c.block_size)
        self.form, self.views, self.chunk = str(c.loss_form), str(c.views), int(c.pair_chunk)
        self.seed = int(cfg.train.seed)
        self.intensity_cfg = dataclasses.replace(cfg.augment, rotate_deg=0.0, scale=0.0, translate=0.0, flip=0.0)
        self.global_head = GlobalHead(net.stage_channels[f"enc{len(net.channels) - 1}"], c.global_hidden, c.global_dim)
        self.dense_head = DenseHead(net.stage_channels[f"dec{len(net.channels) - 2}"], c.dense_hidden, c.dense_dim,
                                    spatial_dims=net.spatial_dims)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._active: str | None = None

    # ---- stage bookkeeping ------------------------------------------------------------------------

    @property
    def stage(self) -> str:
        """The stage of the next training step: global before `switch` finished steps, local after."""
        return "global" if int(self.steps_done) < self.switch else "local"

    def trained_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        """The parameters `stage` (default: the current one) trains; every other one is frozen."""
        stage = stage or self.stage
        skip = ("head.", "decoder.", "uafs.dec") if stage == "global" else ("head.",)
        net = [p for n, p in self.net.named_parameters() if not n.startswith(skip)]
        head = self.global_head if stage == "global" else self.dense_head
        return net + list(head.parameters())

    def _enter(self, stage: str) -> None:
        if self._active == stage:
            return
        trained = {id(p) for p in self.trained_parameters(stage)}
        for p in self.parameters():
            p.requires_grad_(id(p) in trained)
        self._active = stage

    def on_step_end(self, step: int) -> None:
        """`step` = index of the step just finished (0-based): the next step is step + 1."""
        self.steps_done.fill_(int(step) + 1)

    # ---- the two losses --------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        stage = self.stage
        self._enter(stage)
        if stage == "global":
            loss = self.global_loss(batch)
            return {"loss": loss, "global": loss.detach(), "stage": torch.zeros((), device=loss.device)}
        loss, anchors = self.local_loss(batch)
        return {"loss": loss, "local": loss.detach(), "anchors": anchors, "stage": torch.ones((), device=loss.device)}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.training_step(batch)

    def global_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """NT-Xent between the two views of every slice, embeddings gathered over DDP ranks."""
        b = batch["image"].shape[0]
        feat = self.net.encode(torch.cat([batch["image"], batch["image2"]]))[-1]
        z = F.normalize(self.global_head(feat), dim=1)
        return in_float32(nt_xent)(gather_with_grad(z[:b]), gather_with_grad(z[b:]), self.global_tau)

    def local_views(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two views of the labelled slices (2n x 1 x H x W), their labels on the base grid (2n x H x W)
        and the batch rows used (n).

        Without a labelled slice in the batch: the whole batch with every label ignored (a zero loss, but
        the same forward on every DDP rank)."""
        labeled = batch["labeled"].bool().to(batch["image"].device)
        if bool(labeled.any()):
            rows = torch.nonzero(labeled).flatten()
            label = batch["label"][rows]
        else:
            rows = torch.arange(labeled.numel(), device=labeled.device)
            label = torch.full_like(batch["label"], -1)
        if self.views == "intensity":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps_done) + 17)
            v = make_views({"image": batch["image"][rows], "label": label}, 2, self.intensity_cfg, gen)
            return torch.cat([v["image"], v["image2"]]), torch.cat([label, label]), rows
        return torch.cat([batch["image"][rows], batch["image2"][rows]]), torch.cat([label, label]), rows

    def to_base_grid(
        self, feat: torch.Tensor, labels: torch.Tensor, thetas: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Geometric views: each view's features mapped back onto the base slice's grid with the inverse
        of its affine; base pixels a view does not cover get label -1."""
        n = feat.shape[0] // 2
        size = (int(feat.shape[-2]), int(feat.shape[-1]))
        base = identity(n, feat.device)
        aligned = [align(feat[:n], thetas[0], base), align(feat[n:], thetas[1], base)]
        inside = torch.cat([overlap_mask(thetas[0], base, size), overlap_mask(thetas[1], base, size)])
        return torch.cat(aligned), torch.where(inside, labels, torch.full_like(labels, -1))

    def local_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The supervised local contrastive loss and the number of anchor pixels it used."""
        images, labels, rows = self.local_views(batch)
        feat = self.net(images).dec[-1]  # 2n x C x H x W
        if self.views == "geometric":
            feat, labels = self.to_base_grid(feat, labels, (batch["theta"][rows], batch["theta2"][rows]))
        if self.mode == "stride":
            z, lab = stride_pixels(feat, labels, self.stride)
            z, lab = z[None], lab[None]
        else:
            z, lab = block_pixels(feat, labels, self.block)
        anchors = (lab > 0).sum().float()  # a count: above 65504 it is inf in float16 (autocast)
        if bool(anchors > 0):
            z = F.normalize(self._head(z), dim=-1)
            total, units = in_float32(local_supcon_parts)(z, lab, self.local_tau, self.form, self.chunk, self.mode == "block")
        else:
            # nothing to contrast: a zero that still runs the head (its batch norm synchronises DDP ranks)
            # and reaches the network, so every rank does the same collective work
            corner = feat.flatten(2)[:, :, 0]  # M x C, one pixel per map
            total = self._head(corner[None]).sum() * 0.0 + feat.sum() * 0.0
            units = torch.zeros((), dtype=torch.long, device=feat.device)
        return total / _global_units(units).to(total.dtype), anchors

    def _head(self, z: torch.Tensor) -> torch.Tensor:
        """The dense head on picked pixels: G x N x C -> G x N x D (its 1x1 convs act per pixel)."""
        g, n, c = z.shape
        x = z.reshape(g * n, c).t().reshape(1, c, g * n, *([1] * (self.net.spatial_dims - 1)))
        out = self.dense_head(x)
        return out.reshape(out.shape[1], g * n).t().reshape(g, n, -1)
