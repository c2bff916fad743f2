"""Gradient combiners for multi-task losses (GCL's Gradient Mitigator) and the backward passes using them.

A combiner takes per-task gradients `grads` (M x S x P: M tasks, S independent problems such as the
samples of a batch, P flattened gradient entries) and returns the combined update direction (S x P).
Each rule is one small function registered in `COMBINERS`, so another rule (CAGrad, GradDrop, ...) is
one function more:

- `pcgrad` (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020): each task gradient is
  projected onto the normal plane of every other task gradient it conflicts with (negative dot product),
  in random order, then the projected gradients are summed. GCL's default (the paper's exact rule is
  unverified, see docs/methods.md).
- `sum`: the plain sum, i.e. what `sum(losses).backward()` would give (the ablation).

Two drivers apply a combiner:
- `backward_on_features`: surgery on the gradients with respect to a shared feature tensor (M cheap
  backward passes through the heads only, then one backward through the encoder);
- `backward_on_parameters`: surgery on the gradients of the shared parameters (M backward passes through
  the whole graph): the exact per-parameter version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from medcl_cli.errors import unknown_choice

Combiner = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]

_EPS = 1e-12


def sum_grads(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """M x S x P -> S x P: the plain sum of the task gradients."""
    return grads.sum(0)


def pcgrad_project(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """M x S x P -> M x S x P: PCGrad's projected task gradients (before summing).

    For task i and every other task j (in a random order drawn from `generator`, one order per task, shared
    by the S problems), when g_i' . g_j < 0: g_i' <- g_i' - (g_i' . g_j / |g_j|^2) g_j, with g_j the
    original (unprojected) gradient, as in Yu et al. 2020, Alg. 1. Vectorised over S; loops only over
    the M x (M - 1) task pairs (M is the number of meta labels, 3-4).
    """
    m = grads.shape[0]
    sq = (grads * grads).sum(-1, keepdim=True).clamp_min(_EPS)  # M x S x 1
    out = []
    for i in range(m):
        g = grads[i]
        order = [int(j) for j in torch.randperm(m, generator=generator) if int(j) != i]
        for j in order:
            dot = (g * grads[j]).sum(-1, keepdim=True)  # S x 1
            coef = torch.where(dot < 0, dot / sq[j], torch.zeros_like(dot))
            g = g - coef * grads[j]
        out.append(g)
    return torch.stack(out)


def pcgrad(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """M x S x P -> S x P: the sum of PCGrad's projected task gradients."""
    return pcgrad_project(grads, generator).sum(0)


COMBINERS: dict[str, Combiner] = {"pcgrad": pcgrad, "sum": sum_grads}


def get_combiner(name: str) -> Combiner:
    """The combiner registered as `name`, or a UsageError listing the valid names."""
    if name not in COMBINERS:
        raise unknown_choice("gradient combiner", name, COMBINERS)
    return COMBINERS[name]


def conflict_fraction(grads: torch.Tensor) -> torch.Tensor:
    """M x S x P -> scalar: the fraction of (task pair, problem) whose gradients conflict (dot < 0).

    A diagnostic of how much the mitigator has to do: 0 means PCGrad equals the plain sum."""
    m = grads.shape[0]
    if m < 2:
        return grads.new_zeros(())
    dots = torch.einsum("isp,jsp->ijs", grads, grads)
    iu = torch.triu_indices(m, m, 1, device=grads.device)
    return (dots[iu[0], iu[1]] < 0).float().mean()


def _accumulate(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()


def _task_grads(
    losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], keep_last: bool
) -> list[list[torch.Tensor | None]]:
    """Per-task gradients of `losses` w.r.t. `inputs` (None where an input is unused)."""
    out: list[list[torch.Tensor | None]] = []
    for t, loss in enumerate(losses):
        retain = keep_last or t < len(losses) - 1
        out.append(list(torch.autograd.grad(loss, list(inputs), retain_graph=retain, allow_unused=True)))
    return out


def _sum_task(per_task: list[list[torch.Tensor | None]], index: int) -> torch.Tensor | None:
    got = [t for t in (g[index] for g in per_task) if t is not None]
    if not got:
        return None
    total = got[0]
    for g in got[1:]:
        total = total + g
    return total


def backward_on_features(
    losses: Sequence[torch.Tensor],
    feat: torch.Tensor,
    head_params: Sequence[torch.nn.Parameter],
    combine: Combiner,
    scope: str = "sample",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gradient surgery on the shared feature tensor `feat`, then one backward through what produced it.

    losses: the M task losses, all computed from `feat` through the heads (`head_params`). For each task,
    d loss / d feat is taken with autograd over the heads only (cheap); the M feature gradients are
    combined per sample (scope "sample": S = batch size, P = C*H*W) or over the whole batch (scope "batch":
    S = 1); then `feat.backward(combined)` runs the encoder backward once. Head parameters get the plain
    sum of their task gradients (they are shared by the tasks only through the loss, not the encoder).
    Gradients are accumulated into `.grad`, as `Tensor.backward` would. Returns `conflict_fraction` of
    the feature gradients (detached).
    """
    if scope not in ("sample", "batch"):
        raise ValueError(f"surgery scope must be 'sample' or 'batch', got {scope!r}")
    params = [p for p in head_params if p.requires_grad]
    per_task = _task_grads(losses, [feat, *params], keep_last=True)
    g_feat = torch.stack([g[0] if g[0] is not None else torch.zeros_like(feat) for g in per_task])
    s = feat.shape[0] if scope == "sample" else 1
    flat = g_feat.reshape(len(losses), s, -1).float()
    combined = combine(flat, generator)
    _accumulate(params, [_sum_task(per_task, i + 1) for i in range(len(params))])
    feat.backward(combined.reshape(feat.shape).to(feat.dtype))
    return conflict_fraction(flat).detach()


def backward_on_parameters(
    losses: Sequence[torch.Tensor],
    shared_params: Sequence[torch.nn.Parameter],
    head_params: Sequence[torch.nn.Parameter],
    combine: Combiner,
    generator: torch.Generator | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gradient surgery on the flattened gradient of `shared_params` (M full backward passes).

    The exact PCGrad setting: g_m = d loss_m / d theta_shared for every task, combined over the whole
    parameter vector (S = 1); head parameters get the plain sum. Costs M backward passes through the
    network, so it is the slow reference for `backward_on_features`. `reduce` (M x P -> M x P) turns
    this process's task gradients into the global ones before combining (DDP: an all-reduce), so every
    rank combines the same gradients. Returns `conflict_fraction` of the parameter gradients.
    """
    shared = [p for p in shared_params if p.requires_grad]
    heads = [p for p in head_params if p.requires_grad]
    per_task = _task_grads(losses, [*shared, *heads], keep_last=False)
    flat = []
    for g in per_task:
        parts = [(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, shared)]
        flat.append(torch.cat(parts).float())
    stacked = torch.stack(flat)
    if reduce is not None:
        stacked = reduce(stacked)
    combined = combine(stacked[:, None, :], generator)[0]
    conflicts = conflict_fraction(stacked[:, None, :]).detach()
    offset = 0
    for i, p in enumerate(shared):
        n = p.numel()
        used = any(g[i] is not None for g in per_task)  # unused parameters keep grad None (Adam skips them)
        piece = combined[offset : offset + n].reshape(p.shape).to(p.dtype) if used else None
        offset += n
        _accumulate([p], [piece])
    n_sh = len(shared)
    _accumulate(heads, [_sum_task(per_task, n_sh + i) for i in range(len(heads))])
    return conflicts
