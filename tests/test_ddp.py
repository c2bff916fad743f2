"""Distributed training on CPU: 2 gloo processes with the same global batch as one process give the same
gathered embeddings, the same contrastive loss, the same averaged gradients and the same synchronised
batch-norm statistics (gather_with_grad, DistBatchNorm, average_gradients)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from medcl_cli.core import collectives as coll
from medcl_cli.engine import distributed as D
from medcl_cli.methods.losses.contrastive import nt_xent
from medcl_cli.models.heads import GlobalHead
from medcl_cli.models.unet import UNet

GLOBAL_B = 8


def compute(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "net": UNet(2, 1, 3, channels=(4, 8, 16)), "head": GlobalHead(16, 32, 16),
        "unused": nn.Linear(2, 2),  # no loss reaches it: its gradient must stay None, as in one process
    })
    if world > 1:
        model = D.convert_sync_batchnorm(model, torch.device("cpu"))
        D.broadcast_module(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_B, 1, 16, 16, generator=g)
    x2 = x.flip(-1) + 0.1 * torch.randn(GLOBAL_B, 1, 16, 16, generator=g)
    y = torch.randint(0, 3, (GLOBAL_B, 16, 16), generator=g)
    b = GLOBAL_B // world
    sl = slice(rank * b, (rank + 1) * b)
    net, head = model["net"], model["head"]
    z1 = F.normalize(head(net.encode(x[sl])[-1]), dim=1)
    z2 = F.normalize(head(net.encode(x2[sl])[-1]), dim=1)
    z1g, z2g = coll.gather_with_grad(z1), coll.gather_with_grad(z2)
    contrast = nt_xent(z1g, z2g, 0.5)
    ce = F.cross_entropy(net(x[sl]).logits, y[sl])  # a per-pixel mean: global mean = mean of rank means
    (contrast + ce).backward()
    D.average_gradients(model.parameters(), world)
    ce_all = coll.all_reduce_sum(ce.detach()) / world
    return {
        "contrast": contrast.item(),
        "ce": ce_all.item(),
        "gathered": z1g.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "no_grad": sorted(n for n, p in model.named_parameters() if p.grad is None),
        "running_mean": net.encoder[1][1].running_mean.clone(),
    }


def _worker(rank: int, world: int, port: int, out: str, fn: Any = compute, prefix: str = "rank") -> None:
    """One gloo rank: `fn(rank, world)` saved as OUT/PREFIX{rank}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), os.path.join(out, f"{prefix}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, D.free_port(), str(tmp_path)), nprocs=2, join=True)
    single = compute(0, 1)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["gathered"].shape == single["gathered"].shape == (GLOBAL_B, 16)
        assert torch.allclose(got["gathered"], single["gathered"], atol=1e-5)
        assert got["contrast"] == pytest.approx(single["contrast"], abs=1e-5)
        assert got["ce"] == pytest.approx(single["ce"], abs=1e-5)
        assert torch.allclose(got["running_mean"], single["running_mean"], atol=1e-5)
        for n, g in single["grads"].items():
            assert torch.allclose(got["grads"][n], g, atol=1e-4, rtol=1e-3), n
        assert got["no_grad"] == single["no_grad"] == ["unused.bias", "unused.weight"]


def _fit_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    """Rank `rank` of: an uninterrupted 4-step run, and a 2-step run resumed to 4 steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pathlib import Path

    from medcl_cli.config import load_config
    from medcl_cli.engine.loop import FitRequest, fit

    env = D.DistEnv(rank=rank, world=world, local_rank=rank)

    def cfg(steps: int):
        sets = {"data.image_size": 32, "train.batch_size": 4, "model.channels": "[8,16,32]", "train.device": "cpu",
                "train.steps": steps, "train.val_every": 0, "train.deterministic": True, "model.dropout": 0.3,
                "train.seed": 7, "optim.schedule": "constant"}  # a 2-step cosine would differ
        return load_config(sets=[f"{k}={v}" for k, v in sets.items()])

    try:
        fit(FitRequest(cfg=cfg(4), stage="finetune", data=Path(data), out=Path(out) / "full", dist=env))
        fit(FitRequest(cfg=cfg(2), stage="finetune", data=Path(data), out=Path(out) / "cut", dist=env))
        fit(FitRequest(cfg=cfg(4), stage="finetune", data=Path(data), out=Path(out) / "cut", dist=env, resume=True))
    finally:
        D.shutdown()


def test_ddp_resume_restores_every_ranks_generators(tiny_dataset, tmp_path):
    """Two gloo ranks with dropout: a run cut at step 2 and resumed ends on the weights of an uninterrupted
    run, which needs rank 1's own RNG stream back (not only rank 0's)."""
    mp.spawn(_fit_worker, args=(2, D.free_port(), str(tiny_dataset), str(tmp_path)), nprocs=2, join=True)
    from medcl_cli.engine import checkpoint

    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4 and len(b["rng_ranks"]) == 2
    assert not torch.equal(b["rng_ranks"][0]["torch"], b["rng_ranks"][1]["torch"])  # two streams were kept
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_single_process_helpers_are_identities():
    x = torch.randn(3, 4, requires_grad=True)
    assert coll.gather_with_grad(x) is x and coll.all_reduce_sum(x) is x
    env = D.env_from_torchrun()
    assert env.world >= 1 and D.rank_seed(5, 0) == 5 and D.rank_seed(5, 1) != 5
    bn = D.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))
    assert isinstance(bn[0], D.DistBatchNorm)
    assert set(bn.state_dict()) == set(nn.Sequential(nn.BatchNorm2d(3)).state_dict())


@pytest.mark.slow
def test_nproc_per_node_cli_run(tiny_dataset, tmp_path):
    """`medcl finetune --nproc-per-node 2` relaunches through torch.distributed.run and finishes."""
    out = tmp_path / "ddp"
    res = subprocess.run(
        [sys.executable, "-m", "medcl_cli", "finetune", "--data", str(tiny_dataset), "--out", str(out),
         "--steps", "3", "--batch-size", "4", "--image-size", "32", "--device", "cpu", "--nproc-per-node", "2",
         "--set", "model.channels=[8,16,32]"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(out)
    import json

    assert json.loads((out / "run.json").read_text())["world_size"] == 2


def _arco_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    """all_gather_rows on uneven shards, then ARCO's two stages for 2 steps with uneven unlabelled shards."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world)
            rows = torch.arange(3 * rank, dtype=torch.float32).reshape(rank, 3) + 100 * rank  # 0 rows, 1 row
            flags = torch.tensor([True, False, True])[: rank * 3]
            torch.save({"rows": coll.all_gather_rows(rows), "flags": coll.all_gather_rows(flags)},
                       os.path.join(out, f"gather{rank}.pt"))
        _arco_fit(D.DistEnv(rank=rank, world=world, local_rank=rank), data, out)
    finally:
        D.shutdown()


def _arco_fit(env: D.DistEnv, data: str, out: str) -> None:
    import importlib.resources
    from pathlib import Path

    from medcl_cli.config import load_config
    from medcl_cli.engine.loop import FitRequest, fit

    tpl = Path(str(importlib.resources.files("medcl_cli.templates") / "arco.yaml"))
    # global batch 4 with 3 labelled: strided shards give rank 0 no unlabelled slice and rank 1 one
    sets = ["data.image_size=32", "model.channels=[4,8,16,32,64]", "train.batch_size=4", "train.steps=2",
            "train.val_every=0", "train.device=cpu", "arco.labeled_fraction=0.75"]
    cfg = load_config([tpl], sets)
    run = Path(out) / f"world{env.world}"
    fit(FitRequest(cfg=cfg, stage="pretrain", data=Path(data), out=run / "pre", labeled="2", dist=env))
    fit(FitRequest(cfg=cfg, stage="finetune", data=Path(data), out=run / "ft", labeled="2", dist=env,
                   init_from=run / "pre"))


def test_ddp_arco_queues_hold_every_ranks_rows(tiny_dataset, tmp_path):
    """Under DDP ARCO's queues and banks take every rank's rows (all_gather_rows), so rank 0, which sees no
    unlabelled slice here, keeps the queues one process keeps with the same global batch."""
    mp.spawn(_arco_worker, args=(2, D.free_port(), str(tiny_dataset), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(tmp_path / f"gather{r}.pt", weights_only=True)
        assert torch.equal(got["rows"], torch.tensor([[100.0, 101.0, 102.0]]))
        assert torch.equal(got["flags"], torch.tensor([True, False, True]))
    _arco_worker(0, 1, 0, str(tiny_dataset), str(tmp_path))
    from medcl_cli.engine import checkpoint

    for stage, keys in (("pre", ("global_queue", "local_queue")), ("ft", ("nn_bank",))):
        one = checkpoint.load(tmp_path / "world1" / stage / "checkpoints" / "last.pt")["method_state"]
        two = checkpoint.load(tmp_path / "world2" / stage / "checkpoints" / "last.pt")["method_state"]
        for k in keys:  # step 0 seeds the queue with its own rows and pushes them again, step 1 pushes once
            assert int(two[f"{k}.filled"]) == int(one[f"{k}.filled"]) > 0, k
        if stage == "pre":
            assert int(one["global_queue.filled"]) == 3  # one unlabelled slice per step
    two_bank = checkpoint.load(tmp_path / "world2" / "ft" / "checkpoints" / "last.pt")["method_state"]
    assert int(two_bank["bank.filled"].sum()) > 0


def _split_forward(rank: int, world: int) -> dict:
    """arco.split_bn's grouped forward of a 6-row global batch; rank 0's shard has no unlabelled row."""
    from medcl_cli.methods.arco import grouped_forward, row_groups

    torch.manual_seed(0)
    net = UNet(2, 1, 3, channels=(4, 8, 16))
    if world > 1:
        net = D.convert_sync_batchnorm(net, torch.device("cpu"))
        D.broadcast_module(net)
    net.train()
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    lab = torch.tensor([True, True, True, True, False, False])
    x[~lab] = x[~lab] * 3 + 2  # the groups have different statistics
    sl = slice(rank * 6 // world, (rank + 1) * 6 // world)
    out = grouped_forward(net, x[sl], row_groups(lab[sl], True))
    return {"logits": out.logits.detach(), "running_mean": net.encoder[1][1].running_mean.clone()}


def test_ddp_split_bn_matches_one_process_when_a_rank_lacks_a_group(tmp_path):
    """Rank 0 holds 3 labelled rows, rank 1 one labelled and two unlabelled: rank 0 still makes the
    unlabelled call (on an empty batch), so the synchronised batch norm does not hang, and each rank's
    rows get the per-group statistics of the whole global batch, as in one process."""
    mp.spawn(_worker, args=(2, D.free_port(), str(tmp_path), _split_forward, "split"), nprocs=2, join=True)
    single = _split_forward(0, 1)
    got = [torch.load(tmp_path / f"split{r}.pt", weights_only=True) for r in range(2)]
    assert torch.allclose(torch.cat([g["logits"] for g in got]), single["logits"], atol=1e-5)
    for g in got:
        assert torch.allclose(g["running_mean"], single["running_mean"], atol=1e-5)


def _launched_worker(rank: int, port: int, data: str, out: str) -> None:
    """One process as `torchrun --nproc-per-node 1` starts it: RANK/WORLD_SIZE set, world 1."""
    import json
    from pathlib import Path

    from medcl_cli.config import load_config
    from medcl_cli.engine.loop import FitRequest, fit

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = D.env_from_torchrun()
    sets = {"data.image_size": 32, "train.batch_size": 4, "model.channels": "[8,16,32]", "train.device": "cpu",
            "train.steps": 2, "train.val_every": 0}
    try:
        res = fit(FitRequest(cfg=load_config(sets=[f"{k}={v}" for k, v in sets.items()]), stage="finetune",
                             data=Path(data), out=Path(out) / "run", dist=env))
        backend, world = dist.get_backend(), dist.get_world_size()
    finally:
        D.shutdown()
    Path(out, "launched.json").write_text(json.dumps(
        {"launched": env.launched, "enabled": env.enabled, "backend": backend, "world": world, "best": res.best}))


def test_one_process_started_by_torchrun_joins_a_process_group(tiny_dataset, tmp_path):
    """torchrun with one process runs the distributed code path (as torch DDP does): a gloo group of one
    on the CPU, nccl on CUDA (tests/test_cuda.py), validation's broadcast and the per-rank generators."""
    import json

    from medcl_cli.engine import checkpoint

    mp.spawn(_launched_worker, args=(D.free_port(), str(tiny_dataset), str(tmp_path)), nprocs=1, join=True)
    got = json.loads((tmp_path / "launched.json").read_text())
    assert got["launched"] and got["enabled"] and got["backend"] == "gloo" and got["world"] == 1
    assert got["best"] is not None
    assert len(checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["rng_ranks"]) == 1
    assert not D.DistEnv().enabled and D.DistEnv(world=2).enabled  # a plain process stays single
