"""ARCO: semi-supervised contrastive learning with stratified group sampling (You et al., NeurIPS 2023).

One piece past 300 lines: one method, one file (design rule 3); its losses are in `losses/relational.py`
and `losses/segmentation.py`, its memory bank in `arco_bank.py`, its samplers in `samplers.py`.

"Rethinking Semi-Supervised Medical Image Segmentation: A Variance-Reduction Perspective", arXiv
2302.01735. A mean-teacher pair (teacher = EMA of the student, `arco.ema_momentum` 0.99) owned by this
module and saved in its state dict; every batch mixes labelled and unlabelled slices
(`arco.labeled_fraction`, or `train.labeled_fraction_per_batch` when null; paper: half). The stage
comes from `spec.stage`:

- pretrain (relational pre-training, App. E): L_sup (Dice + CE, labelled slices) + L_inst^global +
  L_inst^local. Student on view 1, teacher on view 2. Global: pooled bottleneck -> MLP (+ predictor on
  the student); local: logits pooled to (8 G)^2 -> 1x1-conv head (+ 1x1-conv predictor), cut into 8x8
  patches with stride 4, teacher logits aligned onto view 1 first. Each is a KL between the student and
  teacher similarity distributions over a FIFO queue of K = 36 teacher embeddings (`relational_kl`).
- finetune (anatomical contrastive fine-tuning): L_sup + l1 L_contrast + l2 L_unsup + l3 L_nn with the
  paper's l1 = 0.01, l2 = l3 = 1. Teacher pseudo-labels on the unlabelled slices; those slices are
  CutMix-ed before the student sees them. L_contrast: per class, anchors drawn by the sampler among the
  class's (confident) pixels, positive = teacher class mean (estimated from a sampler draw), negatives
  drawn from a per-class bank of teacher embeddings of the other classes. L_nn: nearest neighbours of
  an image embedding in a 36-entry FIFO bank.

Paper vs code (docs/methods.md section 4), paper by default:
- teacher temperature tau_t = 0.01 (code 0.1: `arco.tau_t`);
- relational losses on the unlabelled slices (code: every slice: `arco.relational_slices=all`);
- L_nn trains the student (code: teacher distances only, no gradient: `arco.nn_student_grad=false`);
- SG groups = (class, cell of a G x G image grid) (code: blocks of the candidates' index order:
  `arco.sampler=index_order`); for bank negatives, which have no position, SAG falls back to SG;
- L_unsup on confident pixels only (code: all pixels x confident fraction: `arco.unsup_mode=weight`);
- no TPS-equivariance loss and no adversarial morphing augmentation (code-only, not cheap: not built).
Neither paper nor code: batch norm per group (`arco.split_bn`, on by default): the student and the
teacher forward the labelled and the unlabelled rows in two calls (`grouped_forward`), where the code
forwards the mixed batch in one call (`arco.split_bn=false`). With one labelled patient the mixed
statistics let the network fit that patient while predicting every other one as foreground (docs/methods.md,
arco).
Memory: representations are computed at sampled pixels only (the fusion head is 1x1 convolutions over
bilinearly upsampled decoder maps, so this equals reading the full map there); queues and banks hold
sampled embeddings only, bounded, on the training device.

`eval_net()` returns the EMA teacher by default (`arco.eval_net=teacher`): it is the temporal ensemble
of the student that produced the pseudo-labels and is the smoother, usually better network in
mean-teacher training; `student` matches the official code, which saves and tests the student.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medcl_cli.core.collectives import all_gather_rows
from medcl_cli.data.augment import align
from medcl_cli.errors import UsageError, unknown_choice
from medcl_cli.methods.arco_bank import (
    SAMPLERS,
    ClassBank,
    FifoQueue,
    cutmix_sources,
    draw,
    gather_pixels,
    pixel_draw,
    point_features,
)
from medcl_cli.methods.ema import make_teacher, update_ema
from medcl_cli.methods.losses.relational import (
    nearest_neighbour_loss,
    prototype_info_nce,
    pseudo_label_ce,
    relational_kl,
)
from medcl_cli.methods.losses.segmentation import dice_ce
from medcl_cli.methods.precision import in_float32
from medcl_cli.methods.samplers import dense_groups, grid_cells
from medcl_cli.models.heads import DenseHead, GlobalHead, Predictor

PATCH = 8  # pooled pixels per side of a local patch (code: 64x64 patches avg-pooled to 8x8)


def _gathered(rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`rows` (None = none) in the dtype of the buffer `like` (its rows' shape), gathered over the ranks."""
    x = like.new_zeros((0, *like.shape[1:])) if rows is None else rows.detach().to(like.dtype)
    return all_gather_rows(x)


def row_groups(lab: torch.Tensor, split: bool) -> list[torch.Tensor]:
    """The row masks `grouped_forward` calls the network on: [] for one call over the whole batch (no
    `split`, or only one group present), else [labelled, unlabelled].

    Under DDP the groups present are agreed over the ranks (one all-reduce of two counts), so a rank
    without rows of a present group still gets its (empty) mask. Computed once per step and shared by the
    student's and the teacher's forward.
    """
    if not split:
        return []
    counts = torch.stack([lab.sum(), (~lab).sum()]).float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    groups = [g for g, n in zip((lab, ~lab), counts.tolist()) if n > 0]
    return groups if len(groups) == 2 else []


def grouped_forward(net: nn.Module, x: torch.Tensor, groups: list[torch.Tensor]) -> Any:
    """`net(x)`; with `groups` (`row_groups`), one call per group (batch norm then normalises each group
    with its own statistics), outputs reassembled in row order. A rank without rows of a group calls the
    network on an empty batch, so every rank makes the same synchronised-batch-norm collectives.
    """
    if not groups:
        return net(x)
    outs = [net(x[g]) for g in groups]
    order = torch.cat([torch.nonzero(g).flatten() for g in groups])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)[inv]

    return type(outs[0])(cat([o.logits for o in outs]), [cat(list(t)) for t in zip(*(o.enc for o in outs))],
                         [cat(list(t)) for t in zip(*(o.dec for o in outs))])


def _check(c: Any, spec: Any, net: nn.Module) -> None:
    if c.sampler not in SAMPLERS:
        raise unknown_choice("arco.sampler", c.sampler, SAMPLERS)
    if c.eval_net not in ("teacher", "student"):
        raise unknown_choice("arco.eval_net", c.eval_net, ("teacher", "student"))
    if c.relational_slices not in ("unlabeled", "all"):
        raise unknown_choice("arco.relational_slices", c.relational_slices, ("unlabeled", "all"))
    if c.unsup_mode not in ("mask", "weight"):
        raise unknown_choice("arco.unsup_mode", c.unsup_mode, ("mask", "weight"))
    if not 0.0 <= c.ema_momentum <= 1.0:
        raise UsageError(f"arco.ema_momentum must be in [0, 1], found {c.ema_momentum}", "the paper uses 0.99")
    if c.labeled_fraction is not None and not 0.0 < c.labeled_fraction < 1.0:
        raise UsageError(
            f"arco.labeled_fraction must be between 0 and 1 (exclusive), found {c.labeled_fraction}",
            "e.g. --set arco.labeled_fraction=0.75, or null to use train.labeled_fraction_per_batch",
        )
    if min(c.tau_s, c.tau_t, c.temperature) <= 0:
        raise UsageError("arco temperatures (tau_s, tau_t, temperature) must be > 0")
    if min(c.grid, c.queue_size, c.nn_queue, c.nn_grid, c.bank_size, c.local_cells, c.nn_topk) < 1:
        raise UsageError("arco grid, queue sizes, nn_grid, nn_topk, bank_size and local_cells must be >= 1")
    if min(c.num_queries, c.num_negatives, c.prototype_samples) < 2:
        raise UsageError("arco.num_queries, num_negatives and prototype_samples must be >= 2")
    if getattr(net, "spatial_dims", 2) != 2:
        raise UsageError("arco is implemented for 2D slices", "set model.spatial_dims=2")
    if spec.stage not in ("pretrain", "finetune"):
        raise UsageError(f"arco has no stage '{spec.stage}'", "use medcl pretrain or medcl finetune")


class ARCO(nn.Module):
    """Mean-teacher semi-supervised method; the stage (pretrain | finetune) comes from the DataSpec."""

    needs = {"labeled", "unlabeled"}
    teacher_synced: torch.Tensor
    global_queue: FifoQueue
    local_queue: FifoQueue
    bank: ClassBank
    nn_bank: FifoQueue

    def __init__(self, net: nn.Module, cfg: Any, spec: Any) -> None:
        super().__init__()
        c = cfg.arco
        unet: Any = net  # models/unet.py UNet: stage_channels, channels
        _check(c, spec, net)
        self.c, self.net, self.stage, self.k = c, net, spec.stage, int(spec.num_classes)
        self.sup_cfg = cfg.supervised
        self.n_views = 2 if self.stage == "pretrain" else 1
        self.labeled_fraction = c.labeled_fraction  # the engine's batch mix; None = train's
        heads: dict[str, nn.Module] = {}
        preds: dict[str, nn.Module] = {}
        if self.stage == "pretrain":
            bottleneck = unet.stage_channels[f"enc{len(unet.channels) - 1}"]
            heads["glob"] = GlobalHead(bottleneck, c.global_hidden, c.global_dim)
            heads["loc"] = DenseHead(self.k, c.local_hidden, c.local_dim)
            preds["glob"] = Predictor(c.global_dim, c.global_hidden)
            preds["loc"] = DenseHead(c.local_dim, c.local_hidden, c.local_dim)
            self.global_queue = FifoQueue(c.queue_size, c.global_dim)
            self.local_queue = FifoQueue(c.queue_size, c.local_dim * PATCH * PATCH)
        else:
            heads["rep"] = DenseHead(sum(unet.channels), c.rep_hidden, c.rep_dim)
            self.bank = ClassBank(self.k, c.bank_size, c.rep_dim)
            self.nn_bank = FifoQueue(c.nn_queue, c.rep_dim * c.nn_grid * c.nn_grid)
        self.heads = nn.ModuleDict(heads)
        self.predictors = nn.ModuleDict(preds)
        self.teacher_net = make_teacher(net)
        self.teacher_heads = make_teacher(self.heads)
        # False until the teacher has copied the student (after any --init-from load); saved with the state
        self.register_buffer("teacher_synced", torch.zeros((), dtype=torch.bool))
        self._pending: dict[str, Any] = {}

    # ---- protocol ---------------------------------------------------------------------------------

    def eval_net(self) -> nn.Module:
        """The EMA teacher (default) or the student, per `arco.eval_net` (see the module docstring)."""
        use_teacher = self.c.eval_net == "teacher" and bool(self.teacher_synced)
        return self.teacher_net if use_teacher else self.net

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not bool(self.teacher_synced):
            update_ema(self.teacher_net, self.net, 0.0)
            update_ema(self.teacher_heads, self.heads, 0.0)
            self.teacher_synced.fill_(True)
        self.teacher_net.train()  # batch statistics in the teacher, as the official code (ema_model.train())
        return self._pretrain(batch) if self.stage == "pretrain" else self._finetune(batch)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.training_step(batch)

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        """EMA update of the teacher (after the optimiser step), then the queue/bank pushes of this step.

        Under DDP every rank pushes every rank's rows (`all_gather_rows`, rank order), so all ranks keep
        the queues and banks one process would keep with the global batch (MoCo's rule), not a bank of
        their own shard each. Every rank gathers every key, an empty one included, so the collectives match.
        """
        update_ema(self.teacher_net, self.net, self.c.ema_momentum)
        update_ema(self.teacher_heads, self.heads, self.c.ema_momentum)
        p, self._pending = self._pending, {}
        if self.stage == "pretrain":
            self.global_queue.push(_gathered(p.get("glob"), self.global_queue.data))
            self.local_queue.push(_gathered(p.get("loc"), self.local_queue.data))
            return
        emb, cls, cell = p.get("bank", (None, None, None))
        self.bank.push(_gathered(emb, self.bank.emb[0]), _gathered(cls, self.bank.cell[0]),
                       _gathered(cell, self.bank.cell[0]))
        self.nn_bank.push(_gathered(p.get("nn"), self.nn_bank.data))

    # ---- shared pieces ----------------------------------------------------------------------------

    def _sup(self, logits: torch.Tensor, label: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
        if not bool(labeled.any()):
            return logits.sum() * 0.0
        return dice_ce(logits[labeled], label[labeled], self.sup_cfg.dice_weight, self.sup_cfg.ce_weight)

    def _local(self, head: Any, logits: torch.Tensor) -> torch.Tensor:
        """(B L) x (d 8 8) L2-normalised patch embeddings of pooled logits (L = (2 G - 1)^2 patches)."""
        pooled = F.adaptive_avg_pool2d(logits, PATCH * self.c.local_cells)
        patches = F.unfold(head(pooled), PATCH, stride=PATCH // 2)
        return F.normalize(patches.transpose(1, 2).reshape(-1, patches.shape[1]).float(), dim=1)

    @staticmethod
    def _rep(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        """The 1x1-conv representation head applied to N sampled feature vectors -> N x D, normalised."""
        out = head(feats.t()[None, :, :, None])[0, :, :, 0].t()
        return F.normalize(out.float(), dim=1)

    # ---- stage 1 ----------------------------------------------------------------------------------

    def _pretrain(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        c = self.c
        lab = batch["labeled"].bool()
        groups = row_groups(lab, c.split_bn)
        out = grouped_forward(self.net, batch["image"], groups)
        sup = self._sup(out.logits, batch["label"], lab)
        # heads run on every slice (same BatchNorm calls on every DDP rank); the relational losses and the
        # queues use the unlabelled slices (paper) or all of them (code: `arco.relational_slices=all`)
        rows = ~lab if c.relational_slices == "unlabeled" else torch.ones_like(lab)
        with torch.no_grad():
            t = grouped_forward(self.teacher_net, batch["image2"], groups)
            t_glob = F.normalize(self.teacher_heads["glob"](t.enc[-1]), dim=1)
            t_logits = align(t.logits, batch["theta2"], batch["theta"])  # onto view 1's grid
            t_loc = self._local(self.teacher_heads["loc"], t_logits)
            patch_rows = rows.repeat_interleave(t_loc.shape[0] // rows.numel())
            t_glob, t_loc = t_glob[rows], t_loc[patch_rows]
            keep = torch.randperm(t_loc.shape[0], device=t_loc.device)[: c.queue_size]
            if int(self.global_queue.filled) == 0:  # first step: real embeddings (every rank's), not the random start
                self.global_queue.push(_gathered(t_glob, self.global_queue.data))
                self.local_queue.push(_gathered(t_loc[keep], self.local_queue.data))
        s_glob = F.normalize(self.predictors["glob"](self.heads["glob"](out.enc[-1])), dim=1)[rows]
        s_loc = self._local(lambda m: self.predictors["loc"](self.heads["loc"](m)), out.logits)[patch_rows]
        zero = out.logits.sum() * 0.0
        if bool(rows.any()):
            l_glob = in_float32(relational_kl)(s_glob, t_glob, self.global_queue.valid(), c.tau_s, c.tau_t)
            l_loc = in_float32(relational_kl)(s_loc, t_loc, self.local_queue.valid(), c.tau_s, c.tau_t)
            self._pending = {"glob": t_glob, "loc": t_loc[keep]}
        else:
            l_glob = l_loc = zero + s_glob.sum() * 0.0 + s_loc.sum() * 0.0
        loss = sup + c.global_weight * l_glob + c.local_weight * l_loc
        return {"loss": loss, "sup": sup.detach(), "global": l_glob.detach(), "local": l_loc.detach()}

    # ---- stage 2 ----------------------------------------------------------------------------------

    def _finetune(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        c = self.c
        x, y, lab = batch["image"], batch["label"], batch["labeled"].bool()
        nb, _, h, w = x.shape
        groups = row_groups(lab, c.split_bn)
        with torch.no_grad():
            t = grouped_forward(self.teacher_net, x, groups)
            conf, plabel = torch.softmax(t.logits.float(), dim=1).max(dim=1)
            target = torch.where(lab[:, None, None], y, plabel)
            conf = torch.where(lab[:, None, None], torch.ones_like(conf), conf)
            src = cutmix_sources(lab, (h, w), c.cutmix_area if c.cutmix else 0.0, None)
            x_mix = gather_pixels(x, src)
            target, conf = gather_pixels(target, src), gather_pixels(conf, src)
        out = grouped_forward(self.net, x_mix, groups)
        sup = self._sup(out.logits, y, lab)
        unl = ~lab
        if bool(unl.any()):
            unsup = in_float32(pseudo_label_ce)(out.logits[unl], target[unl], conf[unl], c.confidence, c.unsup_mode)
        else:
            unsup = out.logits.sum() * 0.0
        contrast, nn_loss = self._contrast_and_nn(out, t, target, conf, lab, src, (nb, h, w))
        loss = sup + c.contrast_weight * contrast + c.unsup_weight * unsup + c.nn_weight * nn_loss
        return {
            "loss": loss,
            "sup": sup.detach(),
            "contrast": contrast.detach(),
            "unsup": unsup.detach(),
            "nn": nn_loss.detach(),
        }

    def _contrast_and_nn(
        self, out: Any, t: Any, target: torch.Tensor, conf: torch.Tensor, lab: torch.Tensor,
        src: torch.Tensor, shape: tuple[int, int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c
        nb, h, w = shape
        dev = target.device
        valid = (target >= 0) & (lab[:, None, None] | (conf >= c.anchor_confidence))
        cls_map = torch.where(valid, target, torch.full_like(target, -1))
        # sampled pixels: anchors (student) and prototype pixels (teacher) of each class present
        a_pts: list[torch.Tensor] = []
        a_cls: list[torch.Tensor] = []
        p_pts: list[torch.Tensor] = []
        p_cls: list[torch.Tensor] = []
        for k in torch.unique(cls_map[cls_map >= 0]).tolist():
            b, yy, xx = torch.nonzero(cls_map == k, as_tuple=True)
            for n, pts, cls in ((c.num_queries, a_pts, a_cls), (c.prototype_samples, p_pts, p_cls)):
                i = pixel_draw(c.sampler, n, b, yy, xx, shape, c.grid, None)
                pts.append(torch.stack([b[i], yy[i], xx[i]]))
                cls.append(torch.full((i.numel(),), k, device=dev, dtype=torch.long))
        g = c.nn_grid
        mid = torch.arange(g, device=dev) + 0.5
        gy, gx = torch.meshgrid((mid * h / g).long(), (mid * w / g).long(), indexing="ij")
        ub = torch.nonzero(~lab).flatten()
        nn_pts = torch.stack(
            [ub.repeat_interleave(g * g), gy.flatten().repeat(ub.numel()), gx.flatten().repeat(ub.numel())]
        )
        empty = torch.zeros(3, 0, dtype=torch.long, device=dev)
        a = torch.cat(a_pts, 1) if a_pts else empty
        p = torch.cat(p_pts, 1) if p_pts else empty
        s_pts = torch.cat([a, nn_pts], 1)
        t_pts = torch.cat([p, nn_pts], 1)
        t_pts = torch.stack([src[t_pts[0], t_pts[1], t_pts[2]], t_pts[1], t_pts[2]])  # teacher saw unmixed slices
        zero = out.logits.sum() * 0.0
        if s_pts.shape[1] < 2:
            return zero, zero
        s_feat = point_features([out.enc[-1], *out.dec], s_pts[0], s_pts[1], s_pts[2], (h, w))
        s_rep = self._rep(self.heads["rep"], s_feat)
        with torch.no_grad():
            t_feat = point_features([t.enc[-1], *t.dec], t_pts[0], t_pts[1], t_pts[2], (h, w))
            t_rep = self._rep(self.teacher_heads["rep"], t_feat)
        na, npr = a.shape[1], p.shape[1]
        anchors, s_nn = s_rep[:na], s_rep[na:]
        protos, t_nn = t_rep[:npr], t_rep[npr:]
        a_cls_t = torch.cat(a_cls) if a_cls else torch.zeros(0, dtype=torch.long, device=dev)
        p_cls_t = torch.cat(p_cls) if p_cls else torch.zeros(0, dtype=torch.long, device=dev)
        p_cell = grid_cells(p[1], p[2], (h, w), c.grid)
        contrast = self._contrast(anchors, a_cls_t, protos, p_cls_t, p_cell) if na else zero
        self._pending["bank"] = (protos, p_cls_t, p_cell)
        nn_loss = zero
        t_img = F.normalize(t_nn.reshape(ub.numel(), -1), dim=1) if ub.numel() else None
        if int(self.nn_bank.filled) == 0:  # first step: start from real embeddings, every rank's (code: random ones)
            self.nn_bank.push(_gathered(t_img, self.nn_bank.data))
        if t_img is not None:
            s_img = F.normalize(s_nn.reshape(ub.numel(), -1), dim=1)
            nn_loss = in_float32(nearest_neighbour_loss)(s_img, t_img, self.nn_bank.valid(), c.nn_topk, c.nn_student_grad)
            self._pending["nn"] = t_img
        return contrast, nn_loss

    def _contrast(
        self, anchors: torch.Tensor, a_cls: torch.Tensor, protos: torch.Tensor, p_cls: torch.Tensor,
        p_cell: torch.Tensor,
    ) -> torch.Tensor:
        """Mean over classes of the prototype InfoNCE; negatives = bank + this step's other-class pixels."""
        c = self.c
        terms = []
        for k in torch.unique(a_cls).tolist():
            mine = p_cls == k
            if not bool(mine.any()):
                continue
            positive = F.normalize(protos[mine].mean(0), dim=0)
            slots, b_cls, b_cell = self.bank.candidates(exclude=k)
            fresh = protos[~mine]
            if slots.numel() + fresh.shape[0] == 0:
                continue
            groups = dense_groups(torch.cat([b_cls, p_cls[~mine]]), torch.cat([b_cell, p_cell[~mine]]))
            idx = draw(c.sampler, c.num_negatives, groups, None, None, c.grid, replace=True)
            from_bank = idx < slots.numel()
            neg = torch.empty(idx.numel(), protos.shape[1], dtype=protos.dtype, device=protos.device)
            neg[from_bank] = self.bank.take(slots[idx[from_bank]]).to(protos.dtype)
            neg[~from_bank] = fresh[idx[~from_bank] - slots.numel()]
            terms.append(in_float32(prototype_info_nce)(anchors[a_cls == k], positive, neg, c.temperature))
        if not terms:
            return anchors.sum() * 0.0
        return torch.stack(terms).mean()
