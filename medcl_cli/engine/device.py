"""Device and precision resolution: `auto|cpu|cuda[:N]|mps` -> torch.device, `auto` precision -> dtype.

Mixed precision runs under `torch.autocast`: on CUDA bf16 where the GPU supports it (no scaler needed),
else fp16 with a GradScaler; on a CPU bf16 only where the CPU computes bf16 natively (AVX512-BF16 or AMX:
`cpu_bf16_supported`). Elsewhere CPU autocast emulates bf16 and is slower than fp32, so `auto` keeps fp32
there and `bf16` is refused. fp16 autocast on CPU is always refused. The methods keep their losses,
softmax statistics, EMA teachers and memory banks in float32 (`methods/precision.py`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

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


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_bf16_supported() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16) and torch's oneDNN uses it.

    torch's own check (`torch.backends.mkldnn` + `torch.ops.mkldnn._is_mkldnn_bf16_supported`, the one
    behind its CPU bf16 kernels) comes first; where that private op is missing, the CPU flags decide.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            native = bool(check())
        except RuntimeError:
            native = False
        if not native:
            return False
        # oneDNN also reports bf16 on plain AVX512 (emulated, slower than fp32): require the native flags
        flags = _cpu_flags()
        return not flags or bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """float32 / bfloat16 / float16 for a `train.precision` value on `device`.

    auto: bf16 (or fp16 without bf16) on CUDA, bf16 on a CPU with native bf16, fp32 elsewhere.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown train.precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if device.type == "cpu":
        if precision == "fp16":
            raise UsageError(
                "train.precision=fp16 needs a CUDA device (fp16 autocast on a CPU is slow and unscaled)",
                "use auto, bf16 (on a CPU with native bf16) or fp32",
            )
        if cpu_bf16_supported():
            return torch.bfloat16
        if precision == "bf16":
            raise UsageError(
                "train.precision=bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX) or a CUDA device; "
                "this CPU would emulate it, slower than fp32",
                "use --set train.precision=auto (fp32 here) or fp32",
            )
        return torch.float32
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise UsageError(f"train.precision={precision} needs a CUDA device or a CPU with native bf16",
                             "use auto or fp32 on MPS")
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast to `dtype` on CUDA and CPU (a dtype from `resolve_precision`); nothing for float32."""
    if device.type in ("cuda", "cpu") and dtype != torch.float32:
        with torch.autocast(device.type, dtype=dtype):
            yield
    else:
        yield
