"""Device and precision resolution: `auto|cpu|cuda[:N]|mps` -> torch.device, `auto` precision -> dtype.

Mixed precision (autocast + GradScaler for fp16) runs on CUDA only: CPU autocast is slower than fp32 for
convolutions on most laptops. bf16 is preferred when the GPU supports it (no scaler needed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from medcl_cli.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch.device for a `--device` value; under DDP `cuda` means `cuda:LOCAL_RANK`."""
    s = (spec or "auto").strip().lower()
    if s == "auto":
        if torch.cuda.is_available():
            s = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            s = "mps"
        else:
            s = "cpu"
    if s == "cpu":
        return torch.device("cpu")
    if s == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UsageError("--device mps: Apple MPS is not available here", "use --device auto or cpu")
        return torch.device("mps")
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA GPU is visible to torch", "use --device cpu (or auto)")
        if s == "cuda":
            return torch.device("cuda", local_rank or 0)
        try:
            idx = int(s.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"--device {spec}: expected cuda:N with N a GPU index") from None
        if idx >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible", "use cuda:0 .. cuda:N-1"
            )
        return torch.device("cuda", idx)
    raise UsageError(f"unknown device '{spec}'", "use auto, cpu, cuda, cuda:N or mps")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """float32 / bfloat16 / float16 for a `train.precision` value on `device`."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown train.precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise UsageError(f"train.precision={precision} needs a CUDA device", "use auto or fp32 on CPU/MPS")
        return torch.float32
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    if device.type == "cuda" and dtype != torch.float32:
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield
