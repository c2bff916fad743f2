"""The method protocol the fit loop drives (docs/architecture.md "Methods"); no logic lives here.

A method is an `nn.Module` built as `Cls(net, cfg, spec)`: `net` the shared U-Net (models/unet.py),
`cfg` the whole resolved `Config` (a method reads its own section, e.g. `cfg.gcl`), `spec` a `DataSpec`.
The loop uses only the members below; shared pieces are functions (methods/losses/, samplers.py,
ema.py, gradients.py, models/heads.py), never a base class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class DataSpec:
    """What a method may know about the data when it builds its heads."""

    num_classes: int  # including background
    meta_cardinality: dict[str, int] = field(default_factory=dict)  # meta column -> number of codes
    stage: str = "finetune"  # pretrain | finetune
    world_size: int = 1  # DDP ranks (for gather_with_grad-based losses)
    meta_categorical: tuple[str, ...] = ()  # meta columns that are categories of a case (data/profile.py)


@runtime_checkable
class Method(Protocol):
    """What the loop calls. Optional members are looked up with getattr (defaults in the loop)."""

    net: nn.Module
    n_views: int  # augmented views per slice the batch carries (1 or 2)
    needs: set[str]  # {"labeled"}, {"unlabeled"}, {"labeled", "unlabeled"}, plus "meta" ...

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one batch; must hold "loss" (scalar); other scalar keys are logged."""
        ...


def call_backward(method: nn.Module, losses: dict[str, torch.Tensor]) -> None:
    """The method's `backward(losses)` when it has one (GCL), else `losses["loss"].backward()`."""
    fn = getattr(method, "backward", None)
    if callable(fn):
        fn(losses)
    else:
        losses["loss"].backward()


def eval_net(method: nn.Module) -> nn.Module:
    """The network validation and export use (an EMA teacher for some methods), default `method.net`."""
    fn = getattr(method, "eval_net", None)
    return fn() if callable(fn) else method.get_submodule("net")  # get_submodule: typed nn.Module


def on_step_end(method: nn.Module, step: int) -> None:
    fn = getattr(method, "on_step_end", None)
    if callable(fn):
        fn(step)
