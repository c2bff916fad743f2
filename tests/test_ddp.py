"""Distributed training on CPU: 2 gloo processes with the same global batch as one process give the same
gathered embeddings, the same contrastive loss, the same averaged gradients and the same synchronised
batch-norm statistics (gather_with_grad, DistBatchNorm, average_gradients)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from medcl_cli.engine import distributed as D
from medcl_cli.methods.losses import nt_xent
from medcl_cli.models.heads import GlobalHead
from medcl_cli.models.unet import UNet

GLOBAL_B = 8


def compute(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = nn.ModuleDict({"net": UNet(2, 1, 3, channels=(4, 8, 16)), "head": GlobalHead(16, 32, 16)})
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
    z1g, z2g = D.gather_with_grad(z1), D.gather_with_grad(z2)
    contrast = nt_xent(z1g, z2g, 0.5)
    ce = F.cross_entropy(net(x[sl]).logits, y[sl])  # a per-pixel mean: global mean = mean of rank means
    (contrast + ce).backward()
    D.average_gradients(model.parameters(), world)
    ce_all = D.all_reduce_sum(ce.detach()) / world
    return {
        "contrast": contrast.item(),
        "ce": ce_all.item(),
        "gathered": z1g.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "running_mean": net.encoder[1][1].running_mean.clone(),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(compute(rank, world), os.path.join(out, f"rank{rank}.pt"))
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


def test_single_process_helpers_are_identities():
    x = torch.randn(3, 4, requires_grad=True)
    assert D.gather_with_grad(x) is x and D.all_reduce_sum(x) is x
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
