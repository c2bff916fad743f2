"""GCL: gradient-guided contrastive pretraining with multi-perspective meta labels.

Wu, Chen, Yan, Zhu, Chen, Wu, "Gradient-Guided Contrastive Learning with Multi-Perspective Meta Labels",
ACM Multimedia 2023, arXiv 2309.08888. No official code exists and the full text could not be read, so
the choices below follow docs/methods.md ("GCL as implemented"); the unverified ones are marked [infer].

One shared encoder (the U-Net's, the decoder is not used), two views of every slice, M meta labels:
- image-wise branch: bottleneck -> GAP -> `GlobalHead` -> one multi-positive SupCon loss per meta label
  (positives: the slices with the same value of that label, including the slice's other view);
- pixel-wise branch: bottleneck -> `DenseHead`, K pixels per slice picked by the Gradient Filter, one
  SupCon loss per meta label over those pixels in both views; a pixel pair is positive when the slices
  share the label and the pixels the base-grid position (`gcl.pixel_positives: position`) [infer];
- Gradient Filter [infer]: a pixel's score is |sum_c dL_img/dF * F| at that pixel (the first-order change
  of the image-wise loss when the pixel's feature vector is removed); the plain channel norm of dL_img/dF is
  constant over pixels because the image branch pools globally, so it cannot rank them. Both views'
  scores are warped back to the base slice with the tracked transforms; the top-k positions valid in
  both views are kept;
- Gradient Mitigator [infer: PCGrad]: per meta label m the task loss is w_img L_img_m + w_pix L_pix_m;
  the M task gradients are combined by `gcl.combiner` either on the bottleneck features (`surgery_on:
  features`, default: M cheap backward passes through the heads, one through the encoder) or on the
  encoder parameters (`surgery_on: parameters`: M backward passes through the encoder, exact PCGrad).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medcl_cli.core.collectives import all_reduce_sum, gather_with_grad
from medcl_cli.data.augment import align, identity, overlap_mask
from medcl_cli.errors import InvalidDataError, UsageError, did_you_mean
from medcl_cli.methods.gradients import (
    backward_on_features,
    backward_on_parameters,
    get_combiner,
)
from medcl_cli.methods.losses.contrastive import pixel_supcon, supcon
from medcl_cli.methods.precision import in_float32
from medcl_cli.methods.samplers import topk_saliency
from medcl_cli.models.heads import DenseHead, GlobalHead
from medcl_cli.models.unet import UNet

SLICE_PART = "slice_part"


AUTO = "auto"
PREFERRED = ("phase", "cardiac_phase")  # the paper's third perspective on ACDC, first when a dataset has it


def auto_meta_labels(cardinality: dict[str, int], categorical: tuple[str, ...]) -> tuple[str, ...]:
    """What `auto` stands for on a dataset: `patient` (when it has two patients or more), one categorical
    column of a case (`phase` first, else the first of `categorical`, e.g. a diagnosis `group`), and
    `slice_part` (slice position, always available)."""
    picks = ["patient"] if cardinality.get("patient", 0) >= 2 else []
    extra = [c for c in PREFERRED if c in categorical] + [c for c in categorical if c not in PREFERRED]
    return (*picks, *extra[:1], SLICE_PART)


def resolve_meta_labels(
    names: tuple[str, ...], cardinality: dict[str, int], categorical: tuple[str, ...], partitions: int
) -> tuple[tuple[str, ...], str]:
    """(the meta labels, a line saying which were chosen): `auto` expands in place (auto_meta_labels),
    explicit names are kept; the result is checked by `check_meta_labels`."""
    if AUTO not in names:
        return check_meta_labels(names, cardinality, partitions), f"gcl meta labels: {', '.join(names)}"
    auto = auto_meta_labels(cardinality, categorical)
    out: list[str] = []
    for name in names:
        out += [a for a in auto if a not in out and a not in names] if name == AUTO else [name]
    labels = check_meta_labels(tuple(out), cardinality, partitions)
    skipped = "" if "patient" in labels else " (one patient only: no patient label)"
    return labels, f"gcl meta labels (auto): {', '.join(labels)}{skipped}; name your own with --set gcl.meta_labels=..."


def check_meta_labels(names: tuple[str, ...], cardinality: dict[str, int], partitions: int) -> tuple[str, ...]:
    """The configured meta labels, validated against the dataset's meta columns before training starts.

    `slice_part` is always available (derived from `slice_position` with `gcl.partitions` buckets); any
    other name must be a meta column of the dataset (cases.csv extras such as `phase`, `group`, the
    `patient` id, or meta.csv columns) with at least two distinct values.
    """
    if not names:
        raise UsageError("gcl.meta_labels is empty", "name at least one meta column, e.g. [auto] or patient,slice_part")
    if len(set(names)) != len(names):
        raise UsageError(f"gcl.meta_labels lists a column twice: {list(names)}", "name each column once")
    available = dict(cardinality)
    available[SLICE_PART] = int(partitions)
    columns = ", ".join(sorted(available))
    for name in names:
        if name not in available:
            suggestion = did_you_mean(name, [*available, AUTO])
            raise InvalidDataError(
                f"GCL meta label '{name}' is not a meta column of this dataset"
                + (f"; {suggestion}" if suggestion else "") + f" (columns: {columns})",
                "set gcl.meta_labels to existing columns (--set gcl.meta_labels=patient,slice_part), or [auto] "
                "for the dataset's own, or add the column to meta.csv / cases.csv",
            )
        if available[name] < 2:
            what = "gcl.partitions" if name == SLICE_PART else f"column '{name}'"
            raise InvalidDataError(
                f"GCL meta label '{name}' has {available[name]} distinct value(s) ({what}); "
                f"a contrastive label needs at least 2 (columns: {columns})",
                "drop it from gcl.meta_labels" + (" or raise gcl.partitions" if name == SLICE_PART else ""),
            )
    return tuple(names)


def slice_parts(position: torch.Tensor, partitions: int) -> torch.Tensor:
    """Slice position in [0, 1] bucketed into `partitions` equal groups (Peng et al. 2021's "partition")."""
    return (position.float() * partitions).long().clamp(0, partitions - 1)


class GCL(nn.Module):
    """Image-wise + pixel-wise meta-label contrast with Gradient Filter and Gradient Mitigator."""

    n_views = 2
    needs = {"unlabeled", "meta"}
    net: UNet  # the concrete U-Net: heads read its stage_channels / spatial_dims, steps call encode

    def __init__(self, net: UNet, cfg: Any, spec: Any) -> None:
        super().__init__()
        g = cfg.gcl
        self.net = net
        self.meta_labels, note = resolve_meta_labels(
            tuple(g.meta_labels), dict(spec.meta_cardinality), tuple(getattr(spec, "meta_categorical", ())), g.partitions
        )
        self.notes = [note]  # logged by the engine: the labels this run contrasts
        self.partitions = int(g.partitions)
        self.tau = float(g.temperature)
        self.pixel_tau = float(g.pixel_temperature)
        self.w_img = float(g.image_weight)
        self.w_pix = float(g.pixel_weight)
        self.topk = int(g.topk)
        self.combine = get_combiner(g.combiner)
        if g.surgery_on not in ("features", "parameters"):
            raise UsageError(f"gcl.surgery_on must be features or parameters, found '{g.surgery_on}'")
        if g.surgery_scope not in ("sample", "batch"):
            raise UsageError(f"gcl.surgery_scope must be sample or batch, found '{g.surgery_scope}'")
        if g.pixel_positives not in ("position", "image"):
            raise UsageError(f"gcl.pixel_positives must be position or image, found '{g.pixel_positives}'")
        self.pixel_positives = str(g.pixel_positives)
        if self.topk < 1:
            raise UsageError(f"gcl.topk must be >= 1, found {self.topk}")
        self.surgery_on = str(g.surgery_on)
        self.surgery_scope = str(g.surgery_scope)
        channels = net.stage_channels[f"enc{len(net.channels) - 1}"]
        self.image_head = GlobalHead(channels, g.proj_hidden, g.proj_dim)
        self.pixel_head = DenseHead(channels, g.proj_hidden, g.pixel_dim, spatial_dims=net.spatial_dims)
        self._feat: torch.Tensor | None = None  # the bottleneck of the last training_step, for backward
        self._conflicts = torch.zeros(())  # conflict fraction measured by the previous backward (a log)
        self._seed = int(cfg.train.seed)
        self._step = 0  # PCGrad's random task order is drawn from (seed, step): same on every rank, resumable

    def meta_codes(self, batch: dict[str, Any]) -> torch.Tensor:
        """M x B integer codes of the configured meta labels (-1 = missing)."""
        device = batch["image"].device
        rows = []
        for name in self.meta_labels:
            if name == SLICE_PART:
                rows.append(slice_parts(batch["slice_position"].to(device), self.partitions))
            else:
                rows.append(batch["meta"][name].to(device).long())
        return torch.stack(rows)

    def filter_scores(self, img_loss: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """Gradient Filter saliency, 2B x H x W: |sum_c (dL_img/dF * F)| per position (no graph kept)."""
        if not (torch.is_grad_enabled() and img_loss.requires_grad):
            return feat.detach().norm(dim=1)  # no graph (evaluation): fall back to feature magnitude
        (grad,) = torch.autograd.grad(img_loss, feat, retain_graph=True)
        return (grad.float() * feat.detach().float()).sum(1).abs()

    def pixel_pairs(
        self, emb: torch.Tensor, score: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """K pixels per slice on the base-slice grid, seen in both views: (p1, p2) B x K x D normalised,
        keep B x K (False = padding pick), idx B x K (flattened base-grid positions).

        Both views' embeddings and scores are warped back onto the base slice's grid with the tracked
        affines (bilinear), so p1[b, k] and p2[b, k] see the same anatomy and idx is comparable across
        slices. Positions outside either view are never picked while enough valid ones exist.
        """
        b = emb.shape[0] // 2
        size = (int(score.shape[-2]), int(score.shape[-1]))
        base = identity(b, theta1.device)
        e1 = align(emb[:b], theta1, base)
        e2 = align(emb[b:], theta2, base)
        s = align(score[:b, None], theta1, base)[:, 0] + align(score[b:, None], theta2, base)[:, 0]
        valid = overlap_mask(theta1, base, size) & overlap_mask(theta2, base, size)
        idx, keep = topk_saliency(s, self.topk, valid)
        d = emb.shape[1]
        flat_idx = idx[:, None, :].expand(b, d, idx.shape[1])
        p1 = e1.flatten(2).gather(2, flat_idx).transpose(1, 2)
        p2 = e2.flatten(2).gather(2, flat_idx).transpose(1, 2)
        return F.normalize(p1, dim=-1), F.normalize(p2, dim=-1), keep, idx

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = torch.cat([batch["image"], batch["image2"]])
        b = batch["image"].shape[0]
        feat = self.net.encode(x)[-1]  # 2B x C x h x w, the shared features
        codes = self.meta_codes(batch)  # M x B
        z = F.normalize(self.image_head(feat), dim=1)
        z_all = gather_with_grad(z.reshape(2, b, -1).transpose(0, 1).reshape(2 * b, -1))
        lab_all = gather_with_grad(codes.t().repeat_interleave(2, dim=0)).t()  # rows: (slice, view) pairs
        img = in_float32(supcon)(z_all, lab_all, self.tau)  # M
        score = self.filter_scores((self.w_img * img).sum(), feat)
        p1, p2, keep, idx = self.pixel_pairs(self.pixel_head(feat), score, batch["theta"], batch["theta2"])
        positions = gather_with_grad(idx) if self.pixel_positives == "position" else None
        valid = gather_with_grad(keep.to(torch.uint8)).bool()  # bool collectives are not portable
        pix_codes = gather_with_grad(codes.t()).t()
        pix = in_float32(pixel_supcon)(gather_with_grad(p1), gather_with_grad(p2), pix_codes, self.pixel_tau, valid, positions)
        out: dict[str, torch.Tensor] = {}
        for m, name in enumerate(self.meta_labels):
            out[f"img_{name}"] = img[m]
            out[f"pix_{name}"] = pix[m]
        out["loss"] = self.w_img * img.sum() + self.w_pix * pix.sum()
        out["pixels_kept"] = keep.float().mean().detach()
        out["conflicts"] = self._conflicts.to(out["loss"].device)
        self._feat = feat
        return out

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.training_step(batch)

    def task_losses(self, losses: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One loss per meta label: w_img L_img_m + w_pix L_pix_m (the Gradient Mitigator's tasks)."""
        return [self.w_img * losses[f"img_{n}"] + self.w_pix * losses[f"pix_{n}"] for n in self.meta_labels]

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.image_head.parameters(), *self.pixel_head.parameters()]

    def backward(self, losses: dict[str, torch.Tensor]) -> None:
        """Gradient Mitigator: per-meta-label gradients combined by `gcl.combiner`, then applied."""
        feat, self._feat = self._feat, None
        if feat is None:
            raise RuntimeError("GCL.backward needs the features of a training_step in the same step")
        tasks = self.task_losses(losses)
        gen = torch.Generator().manual_seed(self._seed * 1_000_003 + self._step)
        if self.surgery_on == "features":
            conflicts = backward_on_features(
                tasks, feat, self.head_parameters(), self.combine, scope=self.surgery_scope, generator=gen
            )
        else:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            # every rank's task gradient is world x its share (gather_with_grad sums the ranks' losses);
            # their sum / world is the global gradient, identical on all ranks before PCGrad
            reduce = (lambda t: all_reduce_sum(t) / world) if world > 1 else None
            conflicts = backward_on_parameters(
                tasks, list(self.net.parameters()), self.head_parameters(), self.combine, gen, reduce=reduce
            )
        self._conflicts = conflicts.detach().float()

    def on_step_end(self, step: int) -> None:
        self._step = step + 1
