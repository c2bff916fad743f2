"""ARCO losses against slow, obvious references (loops over samples, plain math)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medcl_cli.methods.losses.relational import (
    nearest_neighbour_loss,
    prototype_info_nce,
    pseudo_label_ce,
    relational_kl,
)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_relational_kl_matches_loop():
    s, t, q = _unit(5, 8, seed=1), _unit(5, 8, seed=2), _unit(7, 8, seed=3)
    ref = 0.0
    for i in range(5):
        es = [math.exp(float(s[i] @ q[j]) / 0.1) for j in range(7)]
        et = [math.exp(float(t[i] @ q[j]) / 0.01) for j in range(7)]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        ref += sum(pt[j] * math.log(pt[j] / ps[j]) for j in range(7))
    out = relational_kl(s, t, q, tau_s=0.1, tau_t=0.01)
    assert out.item() == pytest.approx(ref / 5, rel=1e-6)
    assert relational_kl(s, s, q, 0.1, 0.1).item() == pytest.approx(0.0, abs=1e-9)


def test_relational_kl_gradient_only_through_student():
    s = _unit(4, 6, seed=1).requires_grad_()
    t = _unit(4, 6, seed=2).requires_grad_()
    relational_kl(s, t, _unit(9, 6, seed=3)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_prototype_info_nce_matches_loop():
    a, pos, neg = _unit(6, 5, seed=4), _unit(5, seed=5), _unit(11, 5, seed=6)
    tau = 0.5
    ref = 0.0
    for i in range(6):
        num = math.exp(float(a[i] @ pos) / tau)
        den = num + sum(math.exp(float(a[i] @ neg[j]) / tau) for j in range(11))
        ref += -math.log(num / den)
    assert prototype_info_nce(a, pos, neg, tau).item() == pytest.approx(ref / 6, rel=1e-9)
    per_anchor = pos.expand(6, 5)  # a Q x D positive gives the same value
    assert prototype_info_nce(a, per_anchor, neg, tau).item() == pytest.approx(ref / 6, rel=1e-9)
    # pulling anchors onto the prototype lowers the loss
    assert prototype_info_nce(pos.expand(6, 5), pos, neg, tau) < prototype_info_nce(a, pos, neg, tau)


def test_pseudo_label_ce_matches_loop_in_both_modes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    target[0, 0, :2] = -1
    conf = torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    thr = 0.5
    ce_sum_mask = ce_sum_weight = 0.0
    n_valid = 0
    for b in range(2):
        valid = [(i, j) for i in range(4) for j in range(4) if target[b, i, j] >= 0]
        frac = sum(1 for i, j in valid if conf[b, i, j] >= thr) / len(valid)
        for i, j in valid:
            lp = torch.log_softmax(logits[b, :, i, j], 0)[target[b, i, j]]
            ce = -float(lp)
            n_valid += 1
            ce_sum_mask += ce if conf[b, i, j] >= thr else 0.0
            ce_sum_weight += ce * frac
    assert pseudo_label_ce(logits, target, conf, thr, "mask").item() == pytest.approx(ce_sum_mask / n_valid)
    assert pseudo_label_ce(logits, target, conf, thr, "weight").item() == pytest.approx(ce_sum_weight / n_valid)
    assert pseudo_label_ce(logits, target, conf, 1.01, "mask").item() == 0.0
    with pytest.raises(ValueError):
        pseudo_label_ce(logits, target, conf, thr, "other")


def test_nearest_neighbour_loss_matches_loop_and_gradient_modes():
    s, t, bank = _unit(3, 6, seed=7), _unit(3, 6, seed=8), _unit(10, 6, seed=9)
    k = 4
    ref_paper = ref_code = 0.0
    for i in range(3):
        sims = [float(s[i] @ bank[j]) for j in range(10)]
        nn = sorted(range(10), key=lambda j: -sims[j])[:k]
        ref_paper += sum(2 - 2 * sims[j] for j in nn) / k
        ref_code += sum(2 - 2 * float(t[i] @ bank[j]) for j in nn) / k
    s_req = s.clone().requires_grad_()
    paper = nearest_neighbour_loss(s_req, t, bank, k, student_grad=True)
    assert paper.item() == pytest.approx(ref_paper / 3)
    paper.backward()
    assert s_req.grad is not None and s_req.grad.abs().sum() > 0
    code = nearest_neighbour_loss(s.clone().requires_grad_(), t, bank, k, student_grad=False)
    assert code.item() == pytest.approx(ref_code / 3)
    assert not code.requires_grad  # the official code's form gives the student no gradient
