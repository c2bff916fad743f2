"""UAFS block: identity where the uncertainty is 1, doubling where it is 0, the formula in between."""

from __future__ import annotations

import math

import pytest
import torch

from medcl_cli.errors import UsageError
from medcl_cli.models.uafs import UAFS


def _last_conv(block: UAFS) -> torch.nn.Module:
    return block.branch[-1]


def test_uniform_branch_gives_identity():
    torch.manual_seed(0)
    block = UAFS(6, m=2).eval()
    with torch.no_grad():  # constant logits -> uniform softmax -> U = 1 -> x' = x
        _last_conv(block).weight.zero_()
        _last_conv(block).bias.fill_(0.3)
    x = torch.randn(2, 6, 9, 11)
    out = block(x)
    assert block.uncertainty is not None and block.uncertainty.shape == (2, 1, 9, 11)
    torch.testing.assert_close(block.uncertainty, torch.ones(2, 1, 9, 11))
    torch.testing.assert_close(out, x)


def test_one_hot_branch_doubles_the_features():
    torch.manual_seed(0)
    block = UAFS(4, m=3, hidden=8).eval()
    with torch.no_grad():  # one logit far above the others -> one-hot softmax -> U ~ 0 -> x' = 2x
        _last_conv(block).weight.zero_()
        _last_conv(block).bias.copy_(torch.tensor([40.0, 0.0, 0.0]))
    x = torch.randn(3, 4, 8, 8)
    out, u = block.forward_with_uncertainty(x)
    assert u.max().item() < 1e-6
    torch.testing.assert_close(out, 2 * x)


def test_matches_the_formula_3d_with_gradients():
    torch.manual_seed(1)
    block = UAFS(5, m=2, hidden=4, kernel=3, spatial_dims=3).eval()
    x = torch.randn(2, 5, 4, 6, 6, requires_grad=True)
    out, u = block.forward_with_uncertainty(x)
    a = torch.softmax(block.branch(x), dim=1)
    ref_u = -(a * a.log()).sum(1, keepdim=True) / math.log(2)
    torch.testing.assert_close(u, ref_u)
    torch.testing.assert_close(out, x + x * (1 - ref_u))
    assert out.shape == x.shape and 0 <= u.min().item() and u.max().item() <= 1
    out.sum().backward()  # the branch learns through the segmentation loss: gradients must reach it
    assert block.branch[0].weight.grad is not None and block.branch[0].weight.grad.abs().sum() > 0


def test_bad_arguments_are_refused():
    with pytest.raises(UsageError):
        UAFS(8, m=1)
    with pytest.raises(UsageError):
        UAFS(8, kernel=2)
