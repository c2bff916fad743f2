"""Float32 islands inside an autocast region: the methods' losses run in float32 under bf16/fp16 autocast.

Under autocast (engine/device.py) the network's convolutions and matmuls run in bf16 (or fp16 on CUDA);
its outputs come back in that dtype. A contrastive loss built on them would compute its similarity
matrix, exp and log-sum-exp in bf16 (8 bits of mantissa: a temperature-scaled logit of 10 is off by 0.04),
so every loss is called through `in_float32`: floating tensor arguments are cast to float32 (float64
stays float64) and autocast is off for the call, so its matmuls stay float32 too. EMA updates and the
memory banks run outside autocast and keep their float32 buffers (they cast what they store).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

import torch

P = ParamSpec("P")
R = TypeVar("R")


def to_float32(x: Any) -> Any:
    """`x` with every reduced-precision floating tensor (also inside lists, tuples, dicts) as float32."""
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() and x.dtype != torch.float64 else x
    if isinstance(x, (list, tuple)):
        return type(x)(to_float32(v) for v in x)
    if isinstance(x, dict):
        return {k: to_float32(v) for k, v in x.items()}
    return x


def _device_type(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v):
            return v.device.type
    return "cpu"


def in_float32(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` run in float32: autocast off, reduced-precision tensor arguments cast to float32."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        device_type = _device_type(args, kwargs)
        if not torch.is_autocast_enabled(device_type):
            return fn(*to_float32(args), **to_float32(kwargs))
        with torch.autocast(device_type, enabled=False):
            return fn(*to_float32(args), **to_float32(kwargs))

    return cast(Callable[P, R], run)
