"""arco as a method: both stages train, the teacher is an EMA checkpointed with the method, the buffers are
bounded, and the pixel plumbing (point-sampled features, CutMix, class banks) matches naive references.

The engine's conformance test runs each method's first stage (pretrain for arco); the fine-tuning stage
goes through the same checks here (train on one fixed batch, checkpoint round trip through the engine).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medcl_cli.config import load_config
from medcl_cli.data.augment import make_views
from medcl_cli.data.batches import BatchSource, labeled_patients, make_sampler, mark_labeled
from medcl_cli.data.dataset import open_slices
from medcl_cli.engine import checkpoint as ckpt_io
from medcl_cli.engine.loop import FitRequest, fit
from medcl_cli.engine.optim import build_optimizer
from medcl_cli.core.protocol import DataSpec, call_backward, eval_net, on_step_end
from medcl_cli.engine.setup import checkpoint_state, restore_state
from medcl_cli.errors import UsageError
from medcl_cli.methods.arco import ARCO
from medcl_cli.methods.arco_bank import ClassBank, cutmix_sources, gather_pixels, point_features
from medcl_cli.models.unet import UNet, build_unet
from medcl_cli.core.report import ListReporter

SIZE = 32
CHANNELS = (4, 8, 16, 32)


def _cfg(*sets: str):
    tpl = Path(str(importlib.resources.files("medcl_cli.templates") / "arco.yaml"))
    small = ["arco.num_queries=32", "arco.prototype_samples=32", "arco.num_negatives=64", "arco.bank_size=256"]
    return load_config([tpl], [f"data.image_size={SIZE}", "optim.lr=0.002", *small, *sets])


def _method(stage: str, *sets: str, k: int = 3) -> ARCO:
    torch.manual_seed(0)
    return ARCO(UNet(2, 1, k, channels=CHANNELS), _cfg(*sets), DataSpec(num_classes=k, stage=stage))


def _batch(seed: int = 0, b: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(b, SIZE, SIZE, dtype=torch.long)
    label[:, 8:20, 6:18] = 1
    label[:, 20:28, 12:26] = 2
    image = label[:, None].float() + 0.3 * torch.randn(b, 1, SIZE, SIZE, generator=g)
    lab = torch.tensor([True, True] + [False] * (b - 2))
    label[~lab] = -1
    base = {"image": image, "label": label, "labeled": lab}
    return make_views(base, 2, _cfg().augment, torch.Generator().manual_seed(seed))


def _train(m: ARCO, steps: int, batch: dict) -> list[dict]:
    opt = build_optimizer(m, _cfg().optim)
    logs = []
    for step in range(steps):
        out = m.training_step(batch)
        logs.append({k: float(v.detach()) for k, v in out.items()})
        call_backward(m, out)
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_step_end(m, step)
    return logs


def test_finetune_stage_conformance(tiny_dataset, tmp_path):
    """The conformance checks of tests/test_conformance.py for arco's second stage."""
    cfg = load_config(
        [Path(str(importlib.resources.files("medcl_cli.templates") / "arco.yaml"))],
        ["data.image_size=32", "model.channels=[4,8,16,32,64]", "train.batch_size=4", "optim.lr=0.002",
         "method=arco"],
    )
    slices = open_slices(tiny_dataset, cfg.data)
    mark_labeled(slices, labeled_patients(slices, "2", 0))
    spec = DataSpec(slices.num_classes, slices.meta_cardinality, "finetune", 1)
    torch.manual_seed(0)
    method = ARCO(build_unet(cfg.model, slices.num_classes), cfg, spec)
    assert method.n_views == 1 and method.needs == {"labeled", "unlabeled"}
    sampler = make_sampler(slices, set(method.needs), 4, 0.5, 0, 0, 1, 0, 1)
    base = BatchSource(slices)[sampler.local_batch(0)]
    assert base["labeled"].any() and (~base["labeled"]).any()
    opt = build_optimizer(method, cfg.optim)
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    losses = []
    for step in range(6):
        batch = make_views(base, method.n_views, cfg.augment, torch.Generator().manual_seed(1))
        out = method.training_step(batch)
        assert {"loss", "sup", "contrast", "unsup", "nn"} <= set(out)
        assert all(torch.isfinite(v).all() for v in out.values()), out
        losses.append(float(out["loss"].detach()))
        call_backward(method, out)
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_step_end(method, step)
    assert np.mean(losses[-2:]) < losses[0], losses
    assert any(not torch.equal(v, before[k]) for k, v in method.net.state_dict().items() if v.is_floating_point())
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ckpt_io.save(tmp_path / "last.pt", checkpoint_state(method, opt, scaler, 6, None, cfg, "finetune", slices, True))
    state = ckpt_io.load(tmp_path / "last.pt")
    assert any(k.startswith("teacher_net.") for k in state["method_state"])  # the teacher is checkpointed
    torch.manual_seed(123)
    fresh = ARCO(build_unet(cfg.model, slices.num_classes), cfg, spec)
    assert restore_state(state, fresh, build_optimizer(fresh, cfg.optim), scaler, torch.device("cpu")) == (6, None)
    assert eval_net(fresh) is fresh.teacher_net
    x = base["image"]
    with torch.no_grad():
        assert torch.equal(eval_net(method).eval()(x).logits, eval_net(fresh).eval()(x).logits)
    sa, sb = method.state_dict(), fresh.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_teacher_is_the_ema_of_the_student_and_starts_as_a_copy():
    m = _method("finetune")
    batch = _batch()
    with torch.no_grad():
        m.net.encoder[0][0].weight.add_(1.0)  # e.g. an --init-from load after construction
    out = m.training_step(batch)
    assert torch.equal(m.teacher_net.encoder[0][0].weight, m.net.encoder[0][0].weight)
    t_before = {k: v.clone() for k, v in m.teacher_net.named_parameters()}
    out["loss"].backward()
    with torch.no_grad():
        for p in m.net.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    m.on_step_end(0)
    for k, v in m.teacher_net.named_parameters():
        s = dict(m.net.named_parameters())[k]
        assert torch.allclose(v, 0.99 * t_before[k] + 0.01 * s, atol=1e-6), k
        assert not v.requires_grad
    assert all(p.requires_grad is False for p in m.teacher_net.parameters())


def test_both_stages_learn_on_a_fixed_batch_and_report_their_terms():
    pre = _method("pretrain")
    assert pre.n_views == 2
    logs = _train(pre, 6, _batch())
    assert {"sup", "global", "local"} <= set(logs[0])
    assert logs[-1]["sup"] < logs[0]["sup"]
    assert all(np.isfinite(v) for log in logs for v in log.values())
    ft = _method("finetune")
    logs = _train(ft, 6, _batch())
    assert logs[0]["contrast"] > 0 and logs[-1]["nn"] > 0  # nn starts once its bank has entries
    assert np.mean([x["loss"] for x in logs[-2:]]) < logs[0]["loss"]


@pytest.mark.parametrize("sampler", ["ns", "sag", "index_order"])
def test_every_sampler_runs_the_finetune_step(sampler):
    m = _method("finetune", f"arco.sampler={sampler}", "arco.nn_student_grad=false", "arco.unsup_mode=weight")
    logs = _train(m, 2, _batch())
    assert all(np.isfinite(v) for log in logs for v in log.values())
    assert logs[1]["contrast"] > 0


def test_buffers_are_bounded_and_hold_only_sampled_embeddings():
    m = _method("finetune")
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.startswith(("net.", "teacher_"))}
    _train(m, 3, _batch())
    after = {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.startswith(("net.", "teacher_"))}
    assert after == shapes  # fixed-size buffers, nothing grows with steps
    assert int(m.bank.filled.sum()) > 0 and (m.bank.filled <= 256).all()
    c = m.c
    assert m.nn_bank.data.numel() == c.nn_queue * c.rep_dim * c.nn_grid**2  # not whole flattened maps
    assert m.bank.emb.device == next(m.net.parameters()).device


def test_eval_net_choice_and_config_errors():
    assert _method("finetune", "arco.eval_net=student").eval_net() is not None
    m = _method("finetune", "arco.eval_net=student")
    _train(m, 1, _batch())
    assert m.eval_net() is m.net
    with pytest.raises(UsageError):
        _method("finetune", "arco.sampler=sgg")
    with pytest.raises(UsageError):
        _method("finetune", "arco.unsup_mode=both")
    with pytest.raises(UsageError, match="arco.labeled_fraction"):
        _method("pretrain", "arco.labeled_fraction=1")


@pytest.mark.parametrize("share,split", [(None, "2 labelled + 2 unlabelled"), (0.75, "3 labelled + 1 unlabelled")])
def test_arco_labeled_fraction_sets_the_engine_batch_mix(tiny_dataset, tmp_path, share, split):
    """arco.labeled_fraction overrides train.labeled_fraction_per_batch for arco only (null: the train value)."""
    tpl = Path(str(importlib.resources.files("medcl_cli.templates") / "arco.yaml"))
    sets = ["data.image_size=32", "model.channels=[4,8,16,32,64]", "train.batch_size=4", "train.steps=1",
            "train.val_every=0", "train.device=cpu", "method=arco"]
    cfg = load_config([tpl], sets + ([f"arco.labeled_fraction={share}"] if share else []))
    rep = ListReporter()
    fit(FitRequest(cfg=cfg, stage="pretrain", data=tiny_dataset, out=tmp_path / "r", labeled="2"), rep)
    assert any(f"batch 4 ({split})" in message for _, message in rep.lines), rep.lines


def test_point_features_equal_reading_the_upsampled_maps():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, s, s, generator=g, dtype=torch.float64) for c, s in ((3, 4), (5, 16), (2, 32))]
    b = torch.randint(0, 2, (200,), generator=g)
    y, x = torch.randint(0, 32, (200,), generator=g), torch.randint(0, 32, (200,), generator=g)
    full = torch.cat([F.interpolate(f, size=(32, 32), mode="bilinear", align_corners=False) for f in feats], 1)
    assert torch.allclose(point_features(feats, b, y, x, (32, 32)), full[b, :, y, x], atol=1e-12)


def test_cutmix_pastes_a_box_from_another_unlabelled_slice():
    lab = torch.tensor([True, False, False, False])
    src = cutmix_sources(lab, (20, 20), 0.25, torch.Generator().manual_seed(0))
    assert (src[0] == 0).all()
    for i in (1, 2, 3):
        other = src[i] != i
        assert int(other.sum()) == 100 and set(src[i][other].tolist()) <= {1, 2, 3} - {i}
    img = torch.arange(4 * 20 * 20, dtype=torch.float32).view(4, 1, 20, 20)
    mixed = gather_pixels(img, src)
    yy, xx = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    assert torch.equal(mixed[:, 0], img[src, 0, yy, xx])


def test_class_bank_is_a_per_class_fifo():
    bank = ClassBank(3, 4, 2)
    pushed: dict[int, list[float]] = {0: [], 1: [], 2: []}
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        cls = torch.randint(0, 3, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
        emb = torch.arange(cls.numel(), dtype=torch.float32)[:, None].repeat(1, 2) + 100 * step
        bank.push(emb, cls, torch.zeros_like(cls))
        for c, e in zip(cls.tolist(), emb[:, 0].tolist()):
            pushed[c].append(e)
    for c in range(3):
        n = int(bank.filled[c])
        assert n == min(4, len(pushed[c]))
        assert sorted(bank.emb[c, :n, 0].tolist()) == sorted(pushed[c][-4:])
    slots, cls, _ = bank.candidates(exclude=1)
    assert (cls != 1).all() and slots.numel() == int(bank.filled[0] + bank.filled[2])


def test_relational_losses_use_the_unlabelled_slices_unless_told_otherwise():
    batch = _batch()
    batch["labeled"] = torch.ones(4, dtype=torch.bool)  # no unlabelled slice in this batch
    paper = _method("pretrain").training_step(batch)
    assert paper["global"] == 0 and paper["local"] == 0 and paper["loss"].requires_grad
    code = _method("pretrain", "arco.relational_slices=all").training_step(batch)
    assert code["global"] > 0 and code["local"] > 0


def test_split_bn_forwards_each_group_with_its_own_batch_statistics():
    """arco.split_bn: labelled and unlabelled rows go through the network in two calls, reassembled in row
    order; in train mode each group equals the network on that group alone (and differs from the joint
    call, whose batch norm mixes them), in eval mode all three agree."""
    from medcl_cli.methods.arco import grouped_forward, row_groups

    torch.manual_seed(0)
    net = UNet(2, 1, 3, channels=CHANNELS)
    x = torch.randn(5, 1, SIZE, SIZE)
    x[torch.tensor([1, 3])] += 2.0  # the two groups have different statistics
    lab = torch.tensor([False, True, False, True, False])
    net.train()
    split = grouped_forward(net, x, row_groups(lab, True))
    assert torch.allclose(split.logits[lab], net(x[lab]).logits, atol=1e-5)
    assert torch.allclose(split.dec[-1][~lab], net(x[~lab]).dec[-1], atol=1e-5)
    assert not torch.allclose(split.logits, net(x).logits, atol=1e-3)
    assert grouped_forward(net, x, row_groups(torch.ones(5, dtype=torch.bool), True)).logits.shape == split.logits.shape
    net.eval()
    with torch.no_grad():
        assert torch.allclose(grouped_forward(net, x, row_groups(lab, True)).logits, net(x).logits, atol=1e-5)
    for stage in ("pretrain", "finetune"):  # both stages train with it
        logs = _train(_method(stage, "arco.split_bn=true"), 3, _batch())
        assert all(np.isfinite(v) for log in logs for v in log.values())
        assert logs[-1]["sup"] < logs[0]["sup"]


def test_point_features_of_bf16_maps_read_the_right_pixels():
    """Under bf16 autocast the maps are bf16, but pixel coordinates above 256 and fractions like 200.5 are
    not bf16 numbers: coordinates and weights are computed in float32."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 64, 64, generator=g).bfloat16()
    b = torch.randint(0, 2, (300,), generator=g)
    y, x = torch.randint(0, 256, (300,), generator=g), torch.randint(0, 256, (300,), generator=g)
    full = F.interpolate(f.float(), size=(256, 256), mode="bilinear", align_corners=False)
    got = point_features([f], b, y, x, (256, 256))
    assert got.dtype == torch.bfloat16
    assert (got.float() - full[b, :, y, x]).abs().max() < 0.05  # bf16 rounding of the result only
