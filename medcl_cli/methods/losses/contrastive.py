"""Loss functions of the contrastive methods: pure tensor functions, shape-documented, paper-cited.

Each is tested against a slow, obvious reference in tests/test_losses_*.py. Inputs are L2-normalised
embeddings unless a docstring says otherwise. Sections below belong to the method families; keep new
functions inside their section.
"""

from __future__ import annotations

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


# ==== PDCR (Liu/Li et al., TMI 2022) ===============================================================


# ==== ARCO (You et al., NeurIPS 2023) ==============================================================


