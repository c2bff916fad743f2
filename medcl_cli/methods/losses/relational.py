"""ARCO's losses (You et al., NeurIPS 2023): relational KL, prototype InfoNCE, confident pseudo-labels,
nearest-neighbour alignment."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
