"""Loss functions of the contrastive methods: pure tensor functions, shape-documented, paper-cited.

Each is tested against a slow, obvious reference in tests/test_losses_*.py. Inputs are L2-normalised
embeddings unless a docstring says otherwise. Sections below belong to the method families; keep new
functions inside their section.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# ==== global / supervised contrast (SimCLR, GCL, semicl) ===========================================

# A finite stand-in for -inf: exp() of it is exactly 0 in float32/float16, yet it never produces NaN
# gradients when a whole row is masked (logits are bounded by 1/tau for normalised inputs).
_MASKED = -1e4


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """NT-Xent / SimCLR loss (Chen et al., ICML 2020, eq. 1) on two views of N samples.

    z1, z2: N x D, L2-normalised; row i of z1 and row i of z2 are the two views of sample i.
    Each of the 2N embeddings is an anchor whose only positive is its other view; the other 2N - 2
    embeddings are negatives. Returns the mean over the 2N anchors (a scalar).
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    logits = (z @ z.t()) / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), _MASKED)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 0.07,
    anchor_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    form: str = "out",
    chunk: int = 2048,
) -> torch.Tensor:
    """Multi-positive supervised contrastive loss (Khosla et al., NeurIPS 2020), for one or several labelings.

    z: N x D, L2-normalised. labels: N (one labeling) or M x N (M labelings of the same embeddings, e.g.
    GCL's meta labels: the similarity matrix and its log-softmax are shared, only the positive masks differ).
    For anchor i the positives are every other j with labels[j] == labels[i]; the denominator runs over
    every k != i. A label < 0 means "missing": that row is neither an anchor nor a positive for that
    labeling, but stays a negative key. `anchor_mask` (N bool) limits the anchors (e.g. non-background
    pixels); `key_mask` (N bool) removes rows entirely (padding): not anchors, positives or negatives.
    form "out": -mean_{p in P(i)} log softmax_i(p) (SupCon L_out, the paper's choice);
    form "in":  -log mean_{p in P(i)} softmax_i(p).
    Anchors without a positive are skipped; the loss is the mean over the remaining anchors (0, still
    attached to the graph, when there are none). Anchor rows are processed in blocks of `chunk` so memory
    is chunk x N, not N x N. Returns a scalar for 1-D labels, an M vector for M x N labels.
    """
    if form not in ("out", "in"):
        raise ValueError(f"supcon form must be 'out' or 'in', got {form!r}")
    n = z.shape[0]
    lab = labels if labels.dim() == 2 else labels[None]
    keys = torch.ones(n, dtype=torch.bool, device=z.device) if key_mask is None else key_mask.bool()
    anchors = keys if anchor_mask is None else keys & anchor_mask.bool()
    total = z.new_zeros(lab.shape[0])
    count = z.new_zeros(lab.shape[0])
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = torch.arange(start, stop, device=z.device)
        logits = (z[start:stop] @ z.t()) / tau  # b x N
        valid = keys[None, :].expand(stop - start, n).clone()
        valid[torch.arange(stop - start, device=z.device), rows] = False
        logits = logits.masked_fill(~valid, _MASKED)
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # b x N
        la = lab[:, start:stop]
        pos = (la[:, :, None] == lab[:, None, :]) & (la[:, :, None] >= 0) & valid[None]  # M x b x N
        npos = pos.sum(-1)
        ok = (npos > 0) & anchors[start:stop][None]
        if form == "out":
            per = -log_prob[None].masked_fill(~pos, 0.0).sum(-1) / npos.clamp_min(1)
        else:
            per = -(torch.logsumexp(log_prob[None].masked_fill(~pos, _MASKED), dim=-1) - npos.clamp_min(1).log())
        total = total + torch.where(ok, per, torch.zeros_like(per)).sum(-1)
        count = count + ok.sum(-1)
    loss = total / count.clamp_min(1)
    return loss if labels.dim() == 2 else loss[0]


def pixel_supcon(
    p1: torch.Tensor,
    p2: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 0.07,
    valid: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """SupCon over K selected pixels per image, seen in two views (GCL's pixel-wise contrast).

    p1, p2: B x K x D, L2-normalised embeddings of the same K pixel positions of image b in view 1 and
    view 2 (position correspondence is the caller's job). labels: B or M x B image-level codes (meta
    labels, -1 = missing) that every selected pixel of the image inherits. positions: B x K long position
    codes in a frame shared by all images (e.g. flattened indices on the base-slice grid), or None.
    With positions, a pixel pair is positive when the images share the label AND the pixels sit at the
    same position (pixel pairs between two images with the same meta label); the pixel's own other view
    is always one. Without positions, every selected pixel of an image with the same label is positive.
    valid: B x K bool; False entries are padding (a position outside a view) and take no part.
    Returns a scalar or an M vector.
    """
    b, k, d = p1.shape
    z = torch.cat([p1.reshape(b * k, d), p2.reshape(b * k, d)], dim=0)
    lab = labels.repeat_interleave(k, dim=-1)
    if positions is not None:
        pos = positions.reshape(b * k).long()
        n_pos = int(pos.max().item()) + 1 if pos.numel() else 1
        lab = torch.where(lab >= 0, lab * n_pos + pos, torch.full_like(lab, -1))
    lab = torch.cat([lab, lab], dim=-1)
    keys = None
    if valid is not None:
        flat = valid.reshape(b * k)
        keys = torch.cat([flat, flat])
    return supcon(z, lab, tau, key_mask=keys)


# ---- semicl: supervised local contrast (Hu et al., MICCAI 2021; methods.md section 2, loss 2) ----

LOCAL_FORMS = ("code", "paper")
_LOCAL_FILL = -1e4  # -inf stand-in in masked log-sum-exps (|logits| <= 1/tau): exp gives 0, grads stay finite


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


# ==== PDCR (Liu/Li et al., TMI 2022) ===============================================================


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


# ==== ARCO (You et al., NeurIPS 2023) ==============================================================


def relational_kl(
    student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, tau_s: float = 0.1, tau_t: float = 0.01
) -> torch.Tensor:
    """ARCO pre-training L_inst (ISD-style relational distillation), App. E.

    student, teacher: N x D (L2-normalised; the student side after its predictor); queue: K x D
    (L2-normalised teacher embeddings of other images). u_s = softmax(student . queue / tau_s),
    u_t = softmax(teacher . queue / tau_t); returns mean_n KL(u_t || u_s) (teacher distribution is the
    target, as in ISD; the gradient flows through the student only). Paper: tau_s = 0.1, tau_t = 0.01
    (the code uses 0.1 for both).
    """
    log_s = F.log_softmax(student @ queue.t() / tau_s, dim=1)
    with torch.no_grad():
        log_t = F.log_softmax(teacher @ queue.t() / tau_t, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


def prototype_info_nce(
    anchors: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float = 0.5
) -> torch.Tensor:
    """ARCO L_contrast for one class c (App. E, eq. E.2-E.3).

    anchors: Q x D queries of class c; positive: D (the class-c prototype = mean representation, or Q x D);
    negatives: N x D keys of the other classes, shared by every query (the paper's R_k^c). All
    L2-normalised. Returns mean_q -log( e^{q.k+/tau} / (e^{q.k+/tau} + sum_{k-} e^{q.k-/tau}) ).
    """
    pos = (anchors * positive).sum(dim=-1, keepdim=True) if positive.dim() == 2 else anchors @ positive[:, None]
    logits = torch.cat([pos, anchors @ negatives.t()], dim=1) / tau
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def pseudo_label_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    confidence: torch.Tensor,
    threshold: float = 0.97,
    mode: str = "mask",
) -> torch.Tensor:
    """ARCO L_unsup: cross-entropy against teacher pseudo-labels on (CutMix-ed) unlabelled images.

    logits: B x K x H x W (student); target: B x H x W long pseudo-labels (-1 = ignore); confidence:
    B x H x W teacher max-probability. mode "mask" (paper, FixMatch form): CE on pixels with
    confidence >= threshold, summed and divided by the number of valid pixels (so the loss shrinks with
    the confident fraction). mode "weight" (official code, `compute_unsupervised_loss`): CE on every
    valid pixel, times the image's fraction of pixels with confidence >= threshold, averaged.
    """
    valid = target >= 0
    ce = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    n_valid = valid.sum().clamp(min=1)
    confident = (confidence >= threshold) & valid
    if mode == "mask":
        return (ce * confident).sum() / n_valid
    if mode == "weight":
        frac = confident.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
        return (ce * valid * frac[:, None, None]).sum() / n_valid
    raise ValueError(f"pseudo_label_ce mode must be 'mask' or 'weight', found {mode!r}")


def nearest_neighbour_loss(
    student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor, topk: int = 5, student_grad: bool = True
) -> torch.Tensor:
    """ARCO L_nn ("diversity"): pull each embedding towards its k nearest neighbours in a FIFO bank.

    student, teacher: B x D; bank: K x D; all L2-normalised. Neighbours are the `topk` bank entries
    closest to the student embedding. student_grad=True (paper): loss = mean(2 - 2 student . neighbour),
    BYOL form, gradient through the student. student_grad=False (official code, `get_revisiting_loss`):
    the same neighbours but distances measured from the teacher embedding, which carries no gradient.
    """
    k = min(int(topk), bank.shape[0])
    sim_s = student @ bank.t()
    idx = sim_s.detach().topk(k, dim=1).indices
    sim = sim_s if student_grad else (teacher @ bank.t()).detach()
    return (2.0 - 2.0 * sim.gather(1, idx)).mean()
