"""Mean-teacher helpers: a frozen copy of a module and its exponential-moving-average update.

Used by ARCO (You et al., NeurIPS 2023: teacher = EMA of the student, momentum 0.99) and by any
method that wants a momentum encoder. Pure functions over modules, no base class.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def make_teacher(net: M) -> M:
    """A deep copy of `net` whose parameters take no gradient (the optimiser never sees them)."""
    teacher = copy.deepcopy(net)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for parameters and float buffers.

    Float buffers (BatchNorm running mean/var) are averaged the same way so the teacher's statistics
    match its weights; integer buffers (`num_batches_tracked`) are copied. The two modules must have the
    same structure (same names, same shapes): a mismatch raises ValueError naming the first difference.
    momentum = 1 keeps the teacher, 0 copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], found {momentum}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    t_bufs = dict(teacher.named_buffers())
    s_bufs = dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
        missing = sorted((t_params.keys() ^ s_params.keys()) | (t_bufs.keys() ^ s_bufs.keys()))
        raise ValueError(f"teacher and student differ in structure, e.g. at '{missing[0]}'")
    weight = 1.0 - momentum
    tp: list[torch.Tensor] = [t_params[k] for k in t_params]
    sp = [s_params[k].detach() for k in t_params]
    if tp:
        torch._foreach_lerp_(tp, sp, weight)
    float_t = [t_bufs[k] for k in t_bufs if t_bufs[k].is_floating_point()]
    float_s = [s_bufs[k].detach() for k in t_bufs if t_bufs[k].is_floating_point()]
    if float_t:
        torch._foreach_lerp_(float_t, float_s, weight)
    for k, buf in t_bufs.items():
        if not buf.is_floating_point():
            buf.copy_(s_bufs[k])
