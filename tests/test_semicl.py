"""semicl as a method: the stage switch inside one loop, what each stage trains, views and resumability."""

from __future__ import annotations

import pytest
import torch

from medcl_cli.config import load_config
from medcl_cli.core.protocol import DataSpec
from medcl_cli.errors import UsageError
from medcl_cli.methods.semicl import SemiCL
from medcl_cli.models.unet import UNet

SIZE = 32


def _method(*sets: str, steps: int = 10) -> SemiCL:
    cfg = load_config(sets=[f"train.steps={steps}", f"data.image_size={SIZE}", "semicl.block_size=8", *sets])
    torch.manual_seed(0)
    net = UNet(2, 1, 3, channels=(4, 8, 16))
    return SemiCL(net, cfg, DataSpec(num_classes=3, stage="pretrain"))


def _batch(b: int = 4, labeled: tuple[bool, ...] = (True, True, False, False), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 1, SIZE, SIZE, generator=g)
    label = torch.zeros(b, SIZE, SIZE, dtype=torch.long)
    label[:, 8:20, 6:18] = 1
    label[:, 20:28, 12:26] = 2
    lab = torch.tensor(labeled)
    label[~lab] = -1
    theta = torch.eye(2, 3).repeat(b, 1, 1)
    theta2 = theta.clone()
    theta2[:, 0, 2] = 0.1  # view 2 shifted
    return {"image": image, "image2": image.flip(-1), "label": label, "labeled": lab, "theta": theta, "theta2": theta2}


def _grads(m: SemiCL) -> dict[str, bool]:
    def has(mod: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())

    return {
        "encoder": has(m.net.encoder),
        "decoder": has(m.net.decoder),
        "global_head": has(m.global_head),
        "dense_head": has(m.dense_head),
        "seg_head": has(m.net.head),
    }


def test_stage_switches_at_the_fraction_and_each_stage_trains_its_parameters():
    m = _method("semicl.global_fraction=0.3", steps=10)
    assert m.switch == 3 and m.needs == {"labeled", "unlabeled"}
    out = m.training_step(_batch())
    assert m.stage == "global" and out["stage"].item() == 0
    out["loss"].backward()
    assert _grads(m) == {"encoder": True, "decoder": False, "global_head": True, "dense_head": False, "seg_head": False}
    assert not any(p.requires_grad for p in m.net.decoder.parameters())
    for step in range(3):
        m.on_step_end(step)
    m.zero_grad(set_to_none=True)
    assert m.stage == "local"
    out = m.training_step(_batch())
    assert out["stage"].item() == 1 and out["anchors"].item() > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert _grads(m) == {"encoder": True, "decoder": True, "global_head": False, "dense_head": True, "seg_head": False}
    trained = {id(p) for p in m.trained_parameters()}
    assert all(p.requires_grad == (id(p) in trained) for p in m.parameters())


@pytest.mark.parametrize("mode", ["stride", "block"])
def test_local_loss_falls_when_trained(mode):
    m = _method("semicl.stages=[local]", f"semicl.mode={mode}")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    batch = _batch(seed=2)
    losses = []
    for _ in range(8):  # views are fixed while steps_done stays 0
        loss = m.training_step(batch)["loss"]
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.05, losses


def test_resume_restores_the_stage_from_method_state():
    m = _method(steps=10)
    for step in range(7):
        m.on_step_end(step)
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("net.")}
    fresh = _method(steps=10)
    assert fresh.stage == "global"
    fresh.load_state_dict(state, strict=False)
    assert fresh.stage == "local" and int(fresh.steps_done) == 7


@pytest.mark.parametrize("mode", ["stride", "block"])
def test_local_loss_uses_only_labelled_slices(mode):
    m = _method("semicl.stages=[local]", f"semicl.mode={mode}")
    assert m.needs == {"labeled"} and m.stage == "local"
    m.eval()  # batch-norm statistics of the batch would otherwise mix the slices
    a, b = _batch(seed=1), _batch(seed=1)
    b["image"][2:] = torch.randn(2, 1, SIZE, SIZE)  # unlabelled slices changed
    with torch.no_grad():
        assert torch.allclose(m.training_step(a)["loss"], m.training_step(b)["loss"])
        c = _batch(seed=1)
        c["image"][:1] += 1.0  # a labelled slice changed
        assert not torch.allclose(m.training_step(a)["loss"], m.training_step(c)["loss"])


def test_intensity_views_keep_geometry_and_are_reproducible_per_step():
    m = _method("semicl.stages=[local]")
    batch = _batch()
    images, labels, rows = m.local_views(batch)
    assert rows.tolist() == [0, 1] and images.shape == (4, 1, SIZE, SIZE)
    assert torch.equal(labels[:2], batch["label"][:2]) and torch.equal(labels[2:], batch["label"][:2])
    assert not torch.allclose(images[:2], images[2:])  # two different intensity draws
    # intensity-only: the views are monotone-ish rescalings of the slice, edges stay where they were
    corr = torch.corrcoef(torch.stack([images[0].flatten(), batch["image"][0].flatten()]))[0, 1]
    assert corr > 0.9
    again, _, _ = m.local_views(batch)
    assert torch.equal(images, again)
    m.on_step_end(0)
    assert not torch.equal(images, m.local_views(batch)[0])


def test_geometric_views_align_features_and_ignore_uncovered_pixels():
    m = _method("semicl.stages=[local]", "semicl.views=geometric")
    batch = _batch()
    feat = torch.arange(SIZE * SIZE, dtype=torch.float32).reshape(1, 1, SIZE, SIZE).repeat(4, 1, 1, 1)
    labels = torch.cat([batch["label"][:2], batch["label"][:2]])
    rows = torch.tensor([0, 1])
    aligned, lab = m.to_base_grid(feat, labels, (batch["theta"][rows], batch["theta2"][rows]))
    assert torch.allclose(aligned[:2], feat[:2], atol=1e-3)  # identity view: unchanged
    assert (lab[2:] == -1).any() and (lab[:2] >= 0).all()  # the shifted view misses a band of the slice
    out = m.training_step(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["anchors"].item() > 0


def test_no_labelled_slice_gives_a_zero_loss_that_backpropagates():
    m = _method("semicl.stages=[local]")
    out = m.training_step(_batch(labeled=(False, False, False, False)))
    assert out["loss"].item() == 0.0 and out["anchors"].item() == 0
    out["loss"].backward()


@pytest.mark.parametrize(
    "bad",
    ["semicl.stages=[local,global]", "semicl.stages=[]", "semicl.stages=[glob]", "semicl.global_fraction=1",
     "semicl.mode=grid", "semicl.loss_form=mean", "semicl.block_size=64", "semicl.local_temperature=0"],
)
def test_bad_settings_are_usage_errors(bad):
    with pytest.raises(UsageError):
        _method(bad)


# ---- through the engine: one fit loop, both stages, resume, then finetune --init-from ----------------


def _fit_cfg(steps: int, *extra: str):
    sets = ["data.image_size=32", "train.batch_size=4", "model.channels=[8,16,32]", "train.device=cpu",
            f"train.steps={steps}", "train.checkpoint_every=100", "train.deterministic=true", "train.log_every=1",
            "train.seed=3", "train.val_every=0", "method=semicl", *extra]
    return load_config(sets=sets)


def test_two_stages_in_one_fit_resume_exactly_and_feed_finetune(tiny_dataset, tmp_path):
    import pandas as pd

    from medcl_cli.engine import checkpoint
    from medcl_cli.engine.loop import FitRequest, fit
    from medcl_cli.errors import Interrupted
    from tests.test_resume import KillAt

    torch.set_num_threads(1)
    full, cut = tmp_path / "full", tmp_path / "cut"
    fit(FitRequest(cfg=_fit_cfg(6), stage="pretrain", data=tiny_dataset, out=full, labeled="2"))
    metrics = pd.read_csv(full / "metrics.csv")
    stage = metrics[metrics.metric == "stage"].set_index("step").value
    assert stage.loc[[1, 2, 3]].eq(0).all() and stage.loc[[4, 5, 6]].eq(1).all()  # switch at 0.5 x 6
    assert metrics[metrics.metric == "anchors"].value.gt(0).all()
    with pytest.raises(Interrupted):  # stopped in the local stage, resumed from method_state
        fit(FitRequest(cfg=_fit_cfg(6), stage="pretrain", data=tiny_dataset, out=cut, labeled="2"), KillAt(5))
    fit(FitRequest(cfg=_fit_cfg(6), stage="pretrain", data=tiny_dataset, out=cut, labeled="2", resume=True))
    a = checkpoint.load(full / "checkpoints" / "last.pt")
    b = checkpoint.load(cut / "checkpoints" / "last.pt")
    assert int(a["method_state"]["steps_done"]) == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["method_state"]:
        assert torch.equal(a["method_state"][k], b["method_state"][k]), k
    # the segmentation head is never trained in pretraining; the decoder is (local stage)
    torch.manual_seed(3)  # the engine builds the network right after seeding with train.seed
    fresh = UNet(2, 1, 4, channels=(8, 16, 32))
    assert torch.equal(a["model"]["head.weight"], fresh.state_dict()["head.weight"])
    assert not torch.equal(a["model"]["decoder.0.up.weight"], fresh.state_dict()["decoder.0.up.weight"])

    ft = tmp_path / "ft"
    cfg = load_config(sets=["data.image_size=32", "train.batch_size=4", "model.channels=[8,16,32]",
                            "train.device=cpu", "train.steps=2", "train.val_every=0"])
    from medcl_cli.core.report import ListReporter

    rep = ListReporter()
    fit(FitRequest(cfg=cfg, stage="finetune", data=tiny_dataset, out=ft, labeled="2",
                   init_from=full / "checkpoints" / "last.pt"), rep)
    assert any("init from" in line and "loaded" in line for _, line in rep.lines)


@pytest.mark.slow
def test_memory_benchmark_smoke(shared_data, tmp_path):
    """benchmarks/semicl_memory.py end to end on real ACDC slices at a tiny size."""
    import importlib.util
    import json

    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "semicl_memory.py"
    spec = importlib.util.spec_from_file_location("semicl_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    acdc = shared_data("acdc")
    code = bench.main(["--data", str(acdc), "--sizes", "32", "--batch", "4", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert {r["config"] for r in res["rows"]} == {"supervised", "semicl stride", "semicl block"}
    assert all(r["step_s"] > 0 and r["peak_mb"] >= 0 for r in res["rows"])
    assert {(r["mode"], r["bounded"]) for r in res["loss_only"]} == {
        ("stride", True), ("stride", False), ("block", True), ("block", False)}


def _ddp_fit(rank: int, world: int, port: int, data: str, out: str) -> None:
    import json
    import os
    from pathlib import Path

    from medcl_cli.engine import distributed as D
    from medcl_cli.engine.loop import FitRequest, fit

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        cfg = _fit_cfg(2, "train.deterministic=false")
        res = fit(FitRequest(cfg=cfg, stage="pretrain", data=Path(data), out=Path(out) / "run", labeled="2",
                             dist=D.DistEnv(rank, world, rank)))
    finally:
        D.shutdown()
    Path(out, f"rank{rank}.json").write_text(json.dumps(res.last_losses))


@pytest.mark.slow
def test_both_stages_under_two_gloo_processes(tiny_dataset, tmp_path):
    """Global then local stage in a 2-process gloo fit: the ranks hold different numbers of labelled
    slices, run the same collectives (no hang) and log the same all-reduced local loss."""
    import json

    import pandas as pd
    import torch.multiprocessing as mp

    from medcl_cli.data.dataset import open_slices
    from medcl_cli.engine import distributed as D

    open_slices(tiny_dataset, _fit_cfg(2).data)
    mp.spawn(_ddp_fit, args=(2, D.free_port(), str(tiny_dataset), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["stage"] == 1 and r0["anchors"] > 0 and r0["local"] == pytest.approx(r1["local"], rel=1e-6)
    m = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert m[(m.metric == "stage") & (m.step == 1)].value.item() == 0
