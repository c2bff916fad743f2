"""semicl's supervised local contrastive loss (Hu et al., MICCAI 2021): pixel embeddings of one class
attract, other classes repel, within a stride- or block-sampled set of pixels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medcl_cli.methods.losses.contrastive import _LOCAL_FILL, LOCAL_FORMS


class _ExpClassSums(torch.autograd.Function):
    """C[g, r, c] = sum over members n of class c (Y one-hot, zero rows = ignored) of
    exp(z_a . z_n / tau - shift), a = anchor `rows[g, r]`, the self pair left out; and the shift (G x R x 1).

    Forward and backward each build the G x R x N similarity matrix once, in place, and keep none of it:
    memory holds one piece's matrix at a time, never one per anchor-member pair in the autograd graph.
    shift = 1/tau (the largest cosine logit: no term can underflow while 2/tau < 60), else the row max.
    The shift is a constant of the graph: callers add it back, so the loss does not depend on it.
    """

    @staticmethod
    def _exp(za: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        if tau < 1 / 30:  # row max: needs the logits first
            e = torch.bmm(za, z.transpose(1, 2)).mul_(1.0 / tau)
            e.scatter_(2, rows[..., None], _LOCAL_FILL)
            shift = e.amax(dim=2, keepdim=True)
            return e.sub_(shift).exp_(), shift
        # constant shift: scale and shift fused into the product (two fewer passes over the R x N matrix)
        shift = za.new_full((*za.shape[:2], 1), 1.0 / tau)
        e = torch.baddbmm(-shift, za, z.transpose(1, 2), alpha=1.0 / tau)
        e.scatter_(2, rows[..., None], _LOCAL_FILL)
        return e.exp_(), shift

    @staticmethod
    def forward(
        ctx: Any, za: torch.Tensor, z: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, tau: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e, shift = _ExpClassSums._exp(za, z, rows, tau)
        ctx.save_for_backward(za, z, y, rows)
        ctx.tau = tau
        ctx.mark_non_differentiable(shift)
        return torch.bmm(e, y), shift

    @staticmethod
    def backward(ctx: Any, grad_c: torch.Tensor, _grad_shift: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        za, z, y, rows = ctx.saved_tensors
        w, _ = _ExpClassSums._exp(za, z, rows, ctx.tau)
        # dL/dlogit of pair (a, n) = exp * grad_c[a, class of n]: a gather of the member's class column
        # (a K = 4 inner-dimension bmm with y^T is memory-bound and 2-3x slower); ignored members -> 0
        cls = torch.where(y.sum(2) > 0, y.argmax(2), y.shape[2])  # G x N, K = ignored
        padded = torch.cat([grad_c, grad_c.new_zeros(*grad_c.shape[:2], 1)], dim=2)
        w.mul_(torch.gather(padded, 2, cls[:, None, :].expand(-1, w.shape[1], -1)))
        grad_za = torch.bmm(w, z).mul_(1.0 / ctx.tau)
        # (za^T w)^T: the R x N matrix is read in its own layout, never copied into a transposed one
        grad_z = torch.bmm(za.transpose(1, 2), w).transpose(1, 2).mul_(1.0 / ctx.tau)
        return grad_za, grad_z, None, None, None


def _local_rows(
    z: torch.Tensor, y: torch.Tensor, zsum: torch.Tensor | None, labels: torch.Tensor, rows: torch.Tensor,
    row_ok: torch.Tensor, tau: float, form: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor losses G x R of the anchors `rows` (G x R indices into each group's N members) and the
    mask of anchors whose loss is defined.

    y: G x N x K one-hot labels (zero rows = ignored); zsum = y^T z (G x K x D, code form). Only the
    per-class sums of exp-similarities (`_ExpClassSums`, G x R x K) touch all N members; the mean positive
    similarity comes from the class sums of embeddings, so it costs no N-sized work. `row_ok` marks real
    anchors (False for padding); an anchor without positives (or, in the paper form, without negatives)
    gets 0 and False.
    """
    counts = y.sum(1)  # G x K
    za = torch.gather(z, 1, rows[..., None].expand(-1, -1, z.shape[2]))  # G x R x D
    la = torch.gather(labels, 1, rows).clamp(min=0)  # G x R
    c, shift = _ExpClassSums.apply(za, z, y, rows, tau)  # G x R x K, G x R x 1
    same = torch.gather(counts, 1, la) - 1  # positives per anchor (self excluded)
    tiny = torch.finfo(c.dtype).tiny
    total = c.sum(-1)
    if zsum is not None:  # code form
        pos_dot = (za * (torch.gather(zsum, 1, la[..., None].expand(-1, -1, z.shape[2])) - za)).sum(-1) / tau
        loss = shift[..., 0] + torch.log(total.clamp_min(tiny)) - pos_dot / same.clamp(min=1)
        ok = row_ok & (same > 0)
    else:
        pos = torch.gather(c, 2, la[..., None])[..., 0]
        others = counts.sum(1, keepdim=True) - torch.gather(counts, 1, la)
        loss = (torch.log((total - pos).clamp_min(tiny)) - torch.log(pos.clamp_min(tiny))) / same.clamp(min=1)
        ok = row_ok & (same > 0) & (others > 0)
    return torch.where(ok, loss, torch.zeros_like(loss)), ok


def local_supcon_terms(
    z: torch.Tensor, labels: torch.Tensor, tau: float, form: str = "code", chunk: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched, masked supervised contrast inside G independent groups of pixels (Hu et al. 2021, eq. 2).

    z: G x N x D L2-normalised pixel embeddings (a group = one pool of pixels: the strided pixels of all
    images and both views, or one spatial block of them); labels: G x N long, `-1` = ignored (neither anchor
    nor positive nor negative: unlabelled, or outside the image after a warp), `0` = background (negative
    only, never an anchor), `>0` = class. Positives of an anchor: the other members of its group with its
    label; each anchor is compared with its group only.

    form "code" (default): SupCon "L_out" as the authors' code computes it, per anchor
        -(1/|P|) sum_p log( exp(s_ap/tau) / sum_{k != a} exp(s_ak/tau) ),
    form "paper": the formula of the paper, per anchor
        -(1/|P|) log( sum_p exp(s_ap/tau) / sum_{n in N} exp(s_an/tau) ), N = members with another label.
    "code" is the default because the published numbers come from it, it is the form Khosla et al. found
    to train best (the log per positive keeps every positive pulling), and it stays defined when a group
    holds one class only (the paper form has no negatives there and drops such anchors).

    Only anchor rows are computed (anchors x members, not members^2), one exp per entry, and no
    anchor x member tensor is kept for backward (`_ExpClassSums` rebuilds it there). Rows are processed in
    pieces of at most `chunk` similarity entries (or one anchor row when a row alone is larger), so peak
    memory is bounded by `chunk` whatever the image size.

    Returns (loss_sum G, anchors G): per group, the summed anchor losses and the number of anchors that
    had a defined loss. Computed in float32 (float64 inputs stay float64), autocast off.
    """
    if form not in LOCAL_FORMS:
        raise ValueError(f"form must be one of {LOCAL_FORMS}, found {form!r}")
    with torch.autocast(z.device.type, enabled=False):
        return _local_terms(z if z.dtype == torch.float64 else z.float(), labels, tau, form, chunk)


def _local_terms(
    z: torch.Tensor, labels: torch.Tensor, tau: float, form: str, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g, n, _ = z.shape
    is_anchor = labels > 0
    per_group = is_anchor.sum(1)
    loss_sum = z.sum() * 0.0 + z.new_zeros(g)
    count = torch.zeros(g, dtype=torch.long, device=z.device)
    if g == 0 or n == 0 or not bool(per_group.any()):
        return loss_sum, count
    # groups by decreasing anchor count (one copy, then every piece is a view of consecutive groups: a
    # piece pads its rows to its first group's count, and nothing per piece is copied into the graph);
    # anchors first inside each group
    by_size = torch.argsort(per_group, descending=True)
    sizes = per_group[by_size].tolist()
    z, labels, is_anchor = z[by_size], labels[by_size], is_anchor[by_size]
    y = F.one_hot(labels.clamp(min=0), int(labels.max()) + 1).to(z.dtype) * (labels >= 0)[..., None]
    zsum = torch.bmm(y.transpose(1, 2), z) if form == "code" else None  # G x K x D class sums
    order = torch.sort((~is_anchor).to(torch.uint8), dim=1, stable=True).indices
    g0 = 0
    while g0 < g and sizes[g0] > 0:
        rows = sizes[g0]
        if rows * n > chunk:  # one group alone exceeds the budget: split its anchor rows
            step = max(1, chunk // n)
            spans = [(g0, g0 + 1, r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
        else:
            g1 = min(g, g0 + max(1, chunk // (rows * n)))
            spans = [(g0, g1, 0, rows)]
        for a, b, r0, r1 in spans:
            pick = order[a:b, r0:r1]
            part = None if zsum is None else zsum[a:b]
            loss, ok = _local_rows(z[a:b], y[a:b], part, labels[a:b], pick, is_anchor[a:b].gather(1, pick), tau, form)
            loss_sum = loss_sum.index_add(0, by_size[a:b], loss.sum(1))
            count = count.index_add(0, by_size[a:b], ok.sum(1))
        g0 = spans[-1][1]
    return loss_sum, count


def local_supcon_parts(
    z: torch.Tensor, labels: torch.Tensor, tau: float, form: str = "code", chunk: int = 1 << 22, blocks: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, units) of the local loss, whose mean is total / units: with `blocks`, the sum of the
    per-block anchor means and the number of blocks with anchors; else the sum over all anchors of all
    groups and their number. Split so that data-parallel ranks can average over the global units."""
    loss_sum, count = local_supcon_terms(z, labels, tau, form, chunk)
    if not blocks:
        return loss_sum.sum(), count.sum()
    has = count > 0
    return (loss_sum / count.clamp(min=1) * has).sum(), has.sum()


def local_supcon(
    z: torch.Tensor, labels: torch.Tensor, tau: float, form: str = "code", chunk: int = 1 << 22
) -> torch.Tensor:
    """Supervised local contrast over one pool of pixels (the stride / downsampling mode of Hu et al.).

    z: N x D L2-normalised embeddings of every kept pixel of every image and view of the batch; labels: N
    (`-1` ignored, `0` background, `>0` class). Mean over the anchors (non-background pixels with a
    defined loss, see `local_supcon_terms`); 0 (still attached to the graph) when there is none.
    """
    total, units = local_supcon_parts(z[None], labels[None], tau, form, chunk)
    return total / units.clamp(min=1)


def local_supcon_blocks(
    z: torch.Tensor, labels: torch.Tensor, tau: float, form: str = "code", chunk: int = 1 << 22
) -> torch.Tensor:
    """Supervised local contrast inside spatial blocks (the block-division mode of Hu et al.).

    z: G x N x D, one row per block holding the block's pixels of every image and view; labels: G x N.
    Each block's loss is the mean over its anchors; the result is the mean over the blocks that have
    anchors, so all-background blocks are skipped as in the paper (the caller may drop them earlier to
    save the head's work). 0 (still attached to the graph) when no block has an anchor.
    """
    total, units = local_supcon_parts(z, labels, tau, form, chunk, blocks=True)
    return total / units.clamp(min=1)
