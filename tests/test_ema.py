"""Mean-teacher helpers: make_teacher freezes a copy; update_ema is the exact EMA of params and buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medcl_cli.methods.ema import make_teacher, update_ema


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_make_teacher_is_a_frozen_independent_copy():
    student = _net()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (_, a), (_, b) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(a, b)
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(teacher.parameters()), next(student.parameters()))


def test_update_ema_formula_for_parameters_and_buffers():
    student = _net()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(3, 1, 8, 8))  # moves BN running stats and num_batches_tracked
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    after_s = {k: v.clone() for k, v in student.state_dict().items()}
    m = 0.99
    update_ema(teacher, student, m)
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, m * before_t[k] + (1 - m) * after_s[k], atol=1e-6), k
        else:
            assert torch.equal(v, after_s[k]), k
    update_ema(teacher, student, 0.0)
    for k, v in teacher.state_dict().items():
        assert torch.allclose(v.double(), after_s[k].double())


def test_update_ema_rejects_mismatch_and_bad_momentum():
    with pytest.raises(ValueError):
        update_ema(_net(), nn.Sequential(nn.Conv2d(1, 4, 3)), 0.9)
    with pytest.raises(ValueError):
        update_ema(_net(), _net(), 1.5)
