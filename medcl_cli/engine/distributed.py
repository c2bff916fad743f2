"""Multi-process training: torchrun environment, gloo (CPU) / nccl (CUDA), gradient averaging,
synchronised batch norm and `gather_with_grad` for contrastive losses.

Why an explicit all-reduce of gradients instead of wrapping the network in DDP: methods own their
backward (GCL combines per-meta-label gradients with PCGrad via `torch.autograd.grad`, several methods
run the network more than once per step, EMA teachers run without gradients). DDP's reducer hooks
assume one forward and one `.backward()` per step and would fire mid-surgery or miss gradients. After
the method's backward, the loop averages every parameter's gradient over the ranks in one flattened
all-reduce (zeros for parameters without a gradient, so every rank sends the same layout). The cost is
the same bytes as DDP, without overlap with the backward pass.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medcl_cli.core.collectives import all_reduce_sum
from medcl_cli.errors import MedclError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: joins a process group even with one process

    @property
    def enabled(self) -> bool:
        """A process group is used: several processes, or one that torchrun started (as torch DDP does)."""
        return self.world > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun (single process when absent)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        launched=under_launcher(),
    )


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo otherwise); nothing for one process."""
    if not env.enabled or (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()


def run_on_main(env: DistEnv, fn: Callable[[], None]) -> None:
    """Run a check on rank 0 only; if it raises, every rank raises (the same MedclError on rank 0)."""
    if not env.enabled or not dist.is_initialized():
        fn()
        return
    error: MedclError | None = None
    if env.is_main:
        try:
            fn()
        except MedclError as exc:
            error = exc
    box: list[Any] = [None if error is None else (type(error).__name__, error.message, error.hint, error.exit_code)]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        _, message, hint, code = box[0]
        remote = MedclError(message, hint)
        remote.exit_code = code
        raise remote


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relaunch(nproc: int, args: list[str]) -> int:
    """Run `medcl ARGS` in `nproc` processes on this machine via torch.distributed.run; its exit code."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "medcl_cli", *args,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // nproc, 1)))
    return subprocess.call(cmd, env=env)


def rank_seed(seed: int, rank: int) -> int:
    """The per-rank seed of dropout and method sampling (rank 0 keeps `seed`)."""
    return int(seed) + 1_000_003 * int(rank)


# ---- collectives with gradients --------------------------------------------------------------------


def average_gradients(params: Iterable[nn.Parameter], world: int) -> None:
    """Mean of every parameter's gradient over the ranks, in one flattened all-reduce.

    A parameter no rank used this step keeps `grad = None`, as in one process, so the optimiser skips it
    (no weight decay or momentum step on a zero gradient); one used on some ranks only gets the mean over
    all ranks, zeros counted, as torch DDP does.
    """
    if world <= 1:
        return
    ps = [p for p in params if p.requires_grad]
    if not ps:
        return
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
    used = torch.tensor([p.grad is not None for p in ps], dtype=parts[0].dtype, device=parts[0].device)
    flat = torch.cat([*parts, used])  # the "who has a gradient" flags ride in the same all-reduce
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    anyone = (flat[-len(ps) :] > 0).tolist()
    flat = flat[: -len(ps)] / world
    i = 0
    for p, has in zip(ps, anyone):
        n = p.numel()
        p.grad = flat[i : i + n].view_as(p).clone() if has else None
        i += n


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's picklable `obj` in rank order (`[obj]` in one process); a collective: all ranks call it."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (identical starting points)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


# ---- synchronised batch norm that also runs on CPU/gloo ---------------------------------------------


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are computed over the whole global batch (all ranks), with
    gradients through the all-reduce; torch's SyncBatchNorm is CUDA-only, this one also runs on gloo."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), count])
        stats = all_reduce_sum(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                tracked = self.num_batches_tracked
                assert tracked is not None  # a buffer whenever track_running_stats is set
                tracked += 1  # in place: the registered buffer itself is incremented
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1) * m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm as torch's SyncBatchNorm (CUDA) or `DistBatchNorm` (CPU); same state dict keys."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistBatchNorm):
        out = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        if module.track_running_stats:  # both modules then hold the three buffers
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                out.get_buffer(name).copy_(module.get_buffer(name))  # get_buffer: typed Tensor, not Optional
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out
