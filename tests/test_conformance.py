"""Every registered method through the same checks (timm-style), so methods registered later are tested
automatically: built from its template config, a few CPU steps on the tiny dataset give finite losses
that fall and change the network; a checkpoint round trip rebuilds identical outputs; a 2-process gloo
run of the real fit loop works for each method."""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from medcl_cli.config import load_config
from medcl_cli.data.augment import make_views
from medcl_cli.data.batches import BatchSource, labeled_patients, make_sampler, mark_labeled
from medcl_cli.data.dataset import open_slices
from medcl_cli.engine import checkpoint as ckpt_io
from medcl_cli.engine import distributed as D
from medcl_cli.engine.optim import build_optimizer
from medcl_cli.core.protocol import call_backward, eval_net, on_step_end
from medcl_cli.core.report import NullReporter
from medcl_cli.engine.setup import checkpoint_state, data_spec, restore_state, with_input_channels
from medcl_cli.methods import REGISTRY, get_info, load_method_class
from medcl_cli.models.unet import build_unet

KEYS = sorted(REGISTRY)
TINY = {
    "data.image_size": 32,
    "model.channels": "[4,8,16,32,64]",
    "train.batch_size": 4,
    "train.device": "cpu",
    "train.val_every": 0,
    "optim.lr": 0.002,
}


def method_config(key: str, **extra: object):
    files = []
    tpl = importlib.resources.files("medcl_cli.templates") / f"{key}.yaml"
    if tpl.is_file():
        files.append(Path(str(tpl)))
    sets = {**TINY, "method": key, **extra}
    return load_config(files, [f"{k}={v}" for k, v in sets.items()])


def _setup(key: str, tiny_dataset: Path):
    cfg = method_config(key)
    stage = get_info(key).stages[0]
    slices = open_slices(tiny_dataset, cfg.data)
    mark_labeled(slices, labeled_patients(slices, "2", 0))
    cfg = with_input_channels(cfg, slices, NullReporter())
    spec = data_spec(slices, stage)  # as the loop builds it (gcl's auto meta labels see phase)
    cls = load_method_class(key)
    torch.manual_seed(0)
    method = cls(build_unet(cfg.model, slices.num_classes), cfg, spec)
    return cfg, stage, slices, spec, cls, method


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("key", KEYS)
def test_method_trains_and_round_trips(key, channels, tiny_dataset, tiny_dataset_2ch, tmp_path):
    """...with a one-channel and a two-channel dataset (multi-sequence MR: every method reads C > 1 inputs)."""
    cfg, stage, slices, spec, cls, method = _setup(key, tiny_dataset if channels == 1 else tiny_dataset_2ch)
    assert slices.channels == channels and cfg.model.in_channels == channels
    assert isinstance(method, torch.nn.Module) and method.n_views in (1, 2) and isinstance(method.needs, (set, frozenset))
    sampler = make_sampler(slices, set(method.needs), 4, 0.5, 0, 0, 1, 0, 1)
    base = BatchSource(slices)[sampler.local_batch(0)]
    assert base["image"].shape[1] == channels
    opt = build_optimizer(method, cfg.optim)
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    losses = []
    for step in range(6):  # one fixed batch and fixed views: the loss must fall
        batch = make_views(base, method.n_views, cfg.augment, torch.Generator().manual_seed(1))
        out = method.training_step(batch)
        assert "loss" in out and out["loss"].ndim == 0
        assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v)), out
        losses.append(float(out["loss"].detach()))
        call_backward(method, out)
        torch.nn.utils.clip_grad_norm_([p for p in method.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_step_end(method, step)
    assert np.mean(losses[-2:]) < losses[0], losses
    changed = [k for k, v in method.net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "no network weight changed"

    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ckpt_io.save(tmp_path / "last.pt", checkpoint_state(method, opt, scaler, 6, None, cfg, stage, slices, full=True))
    state = ckpt_io.load(tmp_path / "last.pt")
    torch.manual_seed(123)
    fresh = cls(build_unet(cfg.model, slices.num_classes), cfg, spec)
    opt2 = build_optimizer(fresh, cfg.optim)
    assert restore_state(state, fresh, opt2, scaler, torch.device("cpu")) == (6, None)
    x = base["image"]
    with torch.no_grad():
        a, b = eval_net(method).eval()(x), eval_net(fresh).eval()(x)
    assert torch.equal(a.logits, b.logits)
    sa, sb = method.state_dict(), fresh.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert state["channel_names"] == slices.channel_names
    net, ck = ckpt_io.load_network(tmp_path / "last.pt")
    with torch.no_grad():
        assert torch.allclose(net(x).logits, a.logits, atol=1e-6)


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    from medcl_cli.engine.loop import FitRequest, fit

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = {}
    try:
        for key in KEYS:
            cfg = method_config(key, **{"train.steps": 1, "train.checkpoint_every": 1})
            stage = get_info(key).stages[0]
            req = FitRequest(cfg=cfg, stage=stage, data=Path(data), out=Path(out) / key, labeled="2",
                             dist=D.DistEnv(rank, world, rank))
            res = fit(req)
            results[key] = res.last_losses["loss"]
    finally:
        D.shutdown()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_every_method_runs_under_two_gloo_processes(tiny_dataset, tmp_path):
    open_slices(tiny_dataset, method_config("supervised").data)  # cache built once, before the ranks start
    mp.spawn(_ddp_worker, args=(2, D.free_port(), str(tiny_dataset), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert set(r0) == set(KEYS)
    for key in KEYS:
        assert np.isfinite(r0[key]) and r0[key] == pytest.approx(r1[key], rel=1e-5)  # all-reduced: same on every rank
        assert ckpt_io.load(tmp_path / key / "checkpoints" / "last.pt")["step"] == 1
        assert json.loads((tmp_path / key / "run.json").read_text())["world_size"] == 2
