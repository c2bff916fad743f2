"""Gradient combiners (PCGrad, sum) on hand-made gradients, and the two surgery backward drivers."""

from __future__ import annotations

import pytest
import torch

from medcl_cli.errors import UsageError
from medcl_cli.methods.gradients import (
    backward_on_features,
    backward_on_parameters,
    conflict_fraction,
    get_combiner,
    pcgrad,
    pcgrad_project,
    sum_grads,
)


def _g(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)[:, None, :]  # M x 1 x P


def ref_pcgrad(grads: list[list[float]], generator: torch.Generator) -> list[list[float]]:
    """Yu et al. 2020 Alg. 1 with plain Python lists (same random order draws as the implementation)."""
    out = []
    for i, gi in enumerate(grads):
        g = list(gi)
        order = [int(j) for j in torch.randperm(len(grads), generator=generator) if int(j) != i]
        for j in order:
            dot = sum(a * b for a, b in zip(g, grads[j]))
            if dot < 0:
                nn = sum(b * b for b in grads[j])
                g = [a - dot / nn * b for a, b in zip(g, grads[j])]
        out.append(g)
    return out


def test_pcgrad_removes_the_conflict_of_hand_made_gradients():
    g = _g((1.0, 0.0), (-1.0, 1.0))
    proj = pcgrad_project(g)[:, 0]
    assert torch.allclose(proj[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(proj[1], torch.tensor([0.0, 1.0], dtype=torch.float64))
    # after projection no task gradient conflicts with the other task's original gradient
    assert proj[0] @ g[1, 0] >= -1e-12 and proj[1] @ g[0, 0] >= -1e-12
    combined = pcgrad(g)[0]
    assert torch.allclose(combined, torch.tensor([0.5, 1.5], dtype=torch.float64))
    # and the combined direction improves both tasks, while the plain sum (0, 1) ignores task 1
    assert combined @ g[0, 0] > 0 and combined @ g[1, 0] > 0
    assert torch.allclose(sum_grads(g)[0], torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    g = _g((1.0, 0.0), (1.0, 1.0), (0.0, 2.0))
    assert torch.allclose(pcgrad_project(g), g)
    assert torch.allclose(pcgrad(g), sum_grads(g))


def test_pcgrad_three_tasks_matches_reference_loop():
    torch.manual_seed(0)
    grads = torch.randn(3, 1, 7, dtype=torch.float64)
    got = pcgrad_project(grads, torch.Generator().manual_seed(3))[:, 0]
    want = torch.tensor(ref_pcgrad(grads[:, 0].tolist(), torch.Generator().manual_seed(3)), dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)


def test_pcgrad_is_independent_per_problem():
    torch.manual_seed(1)
    grads = torch.randn(3, 5, 4, dtype=torch.float64)
    batched = pcgrad(grads, torch.Generator().manual_seed(7))
    # the random order is drawn once per task and shared by the S problems, so the same seed reproduces it
    for s in range(5):
        single = pcgrad(grads[:, s : s + 1], torch.Generator().manual_seed(7))[0]
        assert torch.allclose(batched[s], single, atol=1e-12)


def test_get_combiner_names_and_unknown():
    assert get_combiner("pcgrad") is pcgrad and get_combiner("sum") is sum_grads
    with pytest.raises(UsageError, match="pcgrad"):
        get_combiner("pcgard")


class _Toy(torch.nn.Module):
    """encoder -> shared feature map -> two heads; three task losses that conflict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.unused = torch.nn.Linear(2, 2)
        self.head_a = torch.nn.Linear(3, 4)
        self.head_b = torch.nn.Conv2d(3, 2, 1)

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feat = self.enc(x)
        a = self.head_a(feat.mean((2, 3)))
        b = self.head_b(feat)
        la = a[:, 0].mean() + b[:, 0].mean()
        lb = -1.5 * a[:, 0].mean() + a[:, 1].pow(2).mean()
        lc = b.pow(2).mean() - a[:, 2].sum() - b[:, 0].mean()
        return feat, [la, lb, lc]

    def heads(self) -> list[torch.nn.Parameter]:
        return [*self.head_a.parameters(), *self.head_b.parameters()]

    def shared(self) -> list[torch.nn.Parameter]:
        return [*self.enc.parameters(), *self.unused.parameters()]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("driver", ["features", "parameters"])
def test_sum_combiner_reproduces_the_plain_backward(driver):
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    plain, surg = _Toy(), _Toy()
    _, losses = plain.losses(x)
    sum(losses).backward()
    feat, losses = surg.losses(x)
    if driver == "features":
        backward_on_features(losses, feat, surg.heads(), sum_grads)
    else:
        backward_on_parameters(losses, surg.shared(), surg.heads(), sum_grads)
    want, got = _grads(plain), _grads(surg)
    for name in want:
        if want[name] is None:
            assert got[name] is None, name  # unused parameters keep grad None
        else:
            assert torch.allclose(got[name], want[name], atol=1e-6), name


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_feature_surgery_backpropagates_the_pcgrad_feature_gradient(scope):
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    model = _Toy()
    feat, losses = model.losses(x)
    per = torch.stack([torch.autograd.grad(loss, feat, retain_graph=True)[0] for loss in losses])
    s = 3 if scope == "sample" else 1
    combined = pcgrad(per.reshape(3, s, -1), torch.Generator().manual_seed(5)).reshape(feat.shape)
    want = torch.autograd.grad(feat, list(model.enc.parameters()), grad_outputs=combined, retain_graph=True)
    head_want = torch.autograd.grad(sum(losses), model.heads(), retain_graph=True)
    plain = torch.autograd.grad(feat, list(model.enc.parameters()), grad_outputs=per.sum(0), retain_graph=True)
    backward_on_features(losses, feat, model.heads(), pcgrad, scope=scope, generator=torch.Generator().manual_seed(5))
    for p, w in zip(model.enc.parameters(), want):
        assert torch.allclose(p.grad, w, atol=1e-6)
    for p, w in zip(model.heads(), head_want):
        assert torch.allclose(p.grad, w, atol=1e-6)
    # the per-sample surgery really changed something here: the tasks conflict
    assert not torch.allclose(plain[0], model.enc.weight.grad, atol=1e-6)


def test_parameter_surgery_combines_flattened_parameter_gradients():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    model = _Toy()
    _, losses = model.losses(x)
    enc = list(model.enc.parameters())
    per_task = [torch.autograd.grad(loss, enc, retain_graph=True) for loss in losses]
    flat = torch.stack([torch.cat([g.reshape(-1) for g in grads]) for grads in per_task])
    want = pcgrad(flat[:, None, :], torch.Generator().manual_seed(8))[0]
    assert (flat @ flat.t()).min() < 0  # the toy tasks do conflict
    backward_on_parameters(losses, model.shared(), model.heads(), pcgrad, torch.Generator().manual_seed(8))
    got = torch.cat([p.grad.reshape(-1) for p in enc])
    assert torch.allclose(got, want, atol=1e-6)
    assert model.unused.weight.grad is None
    # accumulation, like Tensor.backward: a second call adds
    _, losses = model.losses(x)
    backward_on_parameters(losses, model.shared(), model.heads(), pcgrad, torch.Generator().manual_seed(8))
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in enc]), 2 * want, atol=1e-5)


def test_conflict_fraction_counts_conflicting_pairs_per_problem():
    g = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[-1.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, -1.0]]])  # M=3, S=2
    # pairs (0,1): s0 conflict, s1 not; (0,2): neither; (1,2): s0 not, s1 conflict -> 2 of 6
    assert conflict_fraction(g).item() == pytest.approx(2 / 6)
    assert conflict_fraction(g[:1]).item() == 0.0
