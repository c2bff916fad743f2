"""GCL: meta-label validation, slice partitions, Gradient Filter (top-k, view correspondence), training
step and the Gradient Mitigator backward (features vs parameters, sum = plain backward)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medcl_cli import config as C
from medcl_cli.data.augment import make_views, warp
from medcl_cli.core.protocol import DataSpec
from medcl_cli.errors import EXIT_INVALID, InvalidDataError, UsageError
from medcl_cli.methods.gcl import GCL, check_meta_labels, resolve_meta_labels, slice_parts
from medcl_cli.methods.gradients import conflict_fraction
from medcl_cli.methods.samplers import topk_saliency
from medcl_cli.models.unet import UNet

CARD = {"patient": 3, "phase": 2, "group": 1, "slice_part": 3}


def test_meta_labels_missing_or_constant_column_is_exit_4_naming_the_columns():
    assert check_meta_labels(("patient", "phase", "slice_part"), CARD, 3) == ("patient", "phase", "slice_part")
    with pytest.raises(InvalidDataError) as err:
        check_meta_labels(("patient", "cycle"), CARD, 3)
    assert err.value.exit_code == EXIT_INVALID
    assert "'cycle'" in err.value.message and "patient" in err.value.message and "phase" in err.value.message
    with pytest.raises(InvalidDataError, match="'group' has 1 distinct"):
        check_meta_labels(("group",), CARD, 3)
    with pytest.raises(InvalidDataError, match="gcl.partitions"):
        check_meta_labels(("slice_part",), CARD, 1)
    with pytest.raises(UsageError):
        check_meta_labels((), CARD, 3)
    with pytest.raises(UsageError):
        check_meta_labels(("patient", "patient"), CARD, 3)


def test_auto_meta_labels_follow_the_dataset_and_explicit_lists_still_work():
    acdc = {"patient": 3, "phase": 2, "group": 3}
    assert resolve_meta_labels(("auto",), acdc, ("group", "phase"), 3)[0] == ("patient", "phase", "slice_part")
    assert resolve_meta_labels(("auto",), acdc, ("group",), 3)[0] == ("patient", "group", "slice_part")
    labels, note = resolve_meta_labels(("auto",), {"patient": 3, "time_index": 0}, (), 3)  # a TCIA brain folder
    assert labels == ("patient", "slice_part") and "auto" in note and "patient, slice_part" in note
    labels, note = resolve_meta_labels(("auto",), {"patient": 1}, (), 3)
    assert labels == ("slice_part",) and "one patient only" in note
    assert resolve_meta_labels(("auto", "group"), acdc, ("phase",), 3)[0] == ("patient", "phase", "slice_part", "group")
    assert resolve_meta_labels(("patient", "group"), acdc, ("phase",), 3)[0] == ("patient", "group")
    with pytest.raises(InvalidDataError, match="did you mean 'phase'"):
        resolve_meta_labels(("patient", "phsae"), acdc, (), 3)


def test_slice_parts_buckets_positions_equally():
    pos = torch.tensor([0.0, 0.3, 0.34, 0.66, 0.67, 0.999, 1.0])
    assert slice_parts(pos, 3).tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert slice_parts(pos, 2).tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_topk_saliency_picks_highest_valid_positions():
    score = torch.tensor([[[0.1, 5.0], [3.0, 4.0]], [[9.0, 1.0], [2.0, 0.5]]])
    idx, keep = topk_saliency(score, 2)
    assert idx.tolist() == [[1, 3], [0, 2]] and keep.all()
    valid = torch.tensor([[[True, False], [True, True]], [[False, False], [False, True]]])
    idx, keep = topk_saliency(score, 2, valid)
    assert idx[0].tolist() == [3, 2] and keep[0].all()
    assert idx[1, 0].item() == 3 and keep[1].tolist() == [True, False]  # only one valid position
    idx, keep = topk_saliency(score, 10)
    assert idx.shape == (2, 4)


def _cfg(**gcl: object) -> C.Config:
    cfg = C.Config()
    return dataclasses.replace(cfg, gcl=dataclasses.replace(cfg.gcl, **{"topk": 8, "proj_hidden": 32, **gcl}))


def _method(**gcl: object) -> GCL:
    torch.manual_seed(0)
    net = UNet(2, 1, 4, channels=(8, 16, 32))
    spec = DataSpec(num_classes=4, meta_cardinality=dict(CARD), stage="pretrain", meta_categorical=("phase",))
    return GCL(net, _cfg(**gcl), spec)


def _batch(b: int = 6, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(b, 1, size, size, generator=g),
        "label": torch.full((b, size, size), -1, dtype=torch.long),
        "slice_position": torch.rand(b, generator=g),
        "meta": {
            "patient": torch.tensor([0, 0, 1, 1, 2, 2])[:b],
            "phase": torch.tensor([0, 1, 0, 1, 0, -1])[:b],
            "group": torch.zeros(b, dtype=torch.long),
        },
    }
    return make_views(batch, 2, C.AugmentConfig(), torch.Generator().manual_seed(2))


def test_construction_validates_config_and_data():
    with pytest.raises(InvalidDataError):
        _method(meta_labels=("patient", "scanner"))
    with pytest.raises(UsageError):
        _method(combiner="average")
    with pytest.raises(UsageError):
        _method(surgery_on="weights")
    with pytest.raises(UsageError):
        _method(pixel_positives="anywhere")


def test_pixel_pairs_correspond_across_views_through_the_tracked_transform():
    m = _method()
    b, d, h, w = 3, 5, 8, 8
    base = torch.randn(b, d, h, w)
    base_score = torch.rand(b, 1, h, w)
    theta1 = torch.eye(2, 3).repeat(b, 1, 1)
    theta1[:, 0, 0] = -1.0  # view 1: the base slice mirrored
    theta2 = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]).repeat(b, 1, 1)  # view 2: rotated 90 degrees
    views = torch.cat([warp(base, theta1), warp(base, theta2)])
    scores = torch.cat([warp(base_score, theta1), warp(base_score, theta2)])[:, 0]
    assert not torch.allclose(views[:b], views[b:])
    p1, p2, keep, idx = m.pixel_pairs(views, scores, theta1, theta2)
    assert p1.shape == (b, 8, d) and keep.all()
    assert torch.allclose(p1, p2, atol=1e-5)  # the same anatomy in both views
    # positions are the top-8 of the score on the base grid, and the embeddings are the base's there
    assert torch.equal(idx, base_score.flatten(1).topk(8, dim=1).indices)
    e = torch.nn.functional.normalize(base, dim=1).flatten(2)
    assert torch.allclose(p1, e.gather(2, idx[:, None].expand(b, d, 8)).transpose(1, 2), atol=1e-5)


def test_filter_scores_rank_pixels_unlike_the_constant_gradient_norm():
    m = _method()
    feat = torch.randn(4, 32, 8, 8, requires_grad=True)
    z = torch.nn.functional.normalize(m.image_head(feat), dim=1)
    loss = (z[:, 0] * torch.arange(1.0, 5.0)).sum()
    (grad,) = torch.autograd.grad(loss, feat, retain_graph=True)
    # after global pooling the gradient's channel norm is the same at every pixel: it cannot rank them
    norm = grad.norm(dim=1)
    assert torch.allclose(norm, norm[:, :1, :1].expand_as(norm))
    score = m.filter_scores(loss, feat)
    assert torch.allclose(score, (grad * feat).sum(1).abs())
    assert (score.flatten(1).std(1) > 0).all()


def test_training_step_losses_per_meta_label_and_finite():
    m = _method()
    out = m.training_step(_batch())
    for name in ("patient", "phase", "slice_part"):
        assert torch.isfinite(out[f"img_{name}"]) and torch.isfinite(out[f"pix_{name}"])
        assert out[f"img_{name}"] > 0
    total = sum(out[f"img_{n}"] + out[f"pix_{n}"] for n in ("patient", "phase", "slice_part"))
    assert torch.allclose(out["loss"], total)
    assert 0 < out["pixels_kept"] <= 1


def _grads(m: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("surgery_on", ["features", "parameters"])
def test_mitigator_with_sum_equals_the_plain_backward(surgery_on):
    batch = _batch()
    plain = _method(combiner="sum", surgery_on=surgery_on)
    plain.training_step(batch)["loss"].backward()
    surg = _method(combiner="sum", surgery_on=surgery_on)
    surg.backward(surg.training_step(batch))
    want, got = _grads(plain), _grads(surg)
    for name, g in want.items():
        if name.startswith("net.decoder") or name.startswith("net.head"):
            assert got[name] is None, name  # pretraining never touches the decoder
        else:
            assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("surgery_on", ["features", "parameters"])
def test_pcgrad_mitigator_updates_encoder_and_heads(surgery_on):
    m = _method(surgery_on=surgery_on)
    m.backward(m.training_step(_batch()))
    grads = _grads(m)
    for name in ("net.encoder.0.0.weight", "image_head.mlp.0.weight", "pixel_head.net.0.weight"):
        assert grads[name] is not None and torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0
    m._feat = None
    with pytest.raises(RuntimeError):
        m.backward({})  # a backward without its training_step


def test_conflicts_metric_reports_the_previous_mitigator_step():
    m = _method()
    out = m.training_step(_batch())
    assert out["conflicts"].item() == 0.0  # nothing measured yet
    per = [torch.autograd.grad(t, m._feat, retain_graph=True)[0] for t in m.task_losses(out)]
    want = conflict_fraction(torch.stack(per).flatten(2))
    m.backward(out)
    assert m.training_step(_batch())["conflicts"].item() == pytest.approx(want.item())


def _project_on_first(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A combiner that, like PCGrad, is positively homogeneous but not additive over ranks (PCGrad finds no
    conflict at initialisation, so it would not tell a rank-local surgery from the global one)."""
    u = torch.nn.functional.normalize(grads[0], dim=-1)
    return (grads * u).sum(-1, keepdim=True).sum(0) * u


def _ddp_grads(rank: int, world: int) -> dict:
    """One GCL step per surgery mode on this rank's half of a fixed global batch; averaged gradients."""
    from medcl_cli.engine import distributed as D

    out = {}
    full = _batch(b=6, size=16)
    n = 6 // world
    for mode in ("features", "parameters"):
        torch.manual_seed(0)
        net = UNet(2, 1, 4, channels=(4, 8, 16))
        m = GCL(net, _cfg(surgery_on=mode, topk=4), DataSpec(4, dict(CARD), "pretrain", world))
        m.combine = _project_on_first
        if world > 1:
            m = D.convert_sync_batchnorm(m, torch.device("cpu"))
        part = {k: (v[rank * n : (rank + 1) * n] if torch.is_tensor(v) else v) for k, v in full.items()}
        part["meta"] = {k: v[rank * n : (rank + 1) * n] for k, v in full["meta"].items()}
        losses = m.training_step(part)
        m.backward(losses)
        D.average_gradients(m.parameters(), world)
        out[mode] = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None and p.grad.any()}
        out[mode + "_loss"] = losses["loss"].item()
    return out


def _ddp_worker(rank: int, world: int, port: int, path: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_ddp_grads(rank, world), os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_reproduce_one_process_in_both_surgery_modes(tmp_path):
    """Gathered losses, per-sample feature surgery and the all-reduced parameter surgery under DDP give
    the gradients of the one-process step on the whole batch."""
    import torch.multiprocessing as mp

    from medcl_cli.engine.distributed import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _ddp_grads(0, 1)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for mode in ("features", "parameters"):
            assert got[mode + "_loss"] == pytest.approx(single[mode + "_loss"], abs=1e-4)
            assert set(got[mode]) == set(single[mode])
            for name, g in single[mode].items():
                assert torch.allclose(got[mode][name], g, rtol=1e-3, atol=1e-5), (mode, name)
