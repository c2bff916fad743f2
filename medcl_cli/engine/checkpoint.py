"""Checkpoints: written atomically, read with `weights_only=True`, rebuilt into a network.

A checkpoint is a plain dict (keys in docs/architecture.md). Everything inside is a tensor, number,
string, list or dict, so `torch.load(weights_only=True)` reads it and a file carrying a pickle payload
(code to run) is refused. A truncated or corrupted file is an `InvalidDataError` naming the file, never
a deep torch traceback.
"""

from __future__ import annotations

import os
import pickle
import random
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from medcl_cli.errors import InputNotFoundError, InvalidDataError

FORMAT = 1


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temp file in the same folder, fsync, rename)."""
    from medcl_cli.core.files import atomic_path

    p = Path(path)
    # torch reports a full disk as a RuntimeError of its zip writer: atomic_path turns it into ENOSPC
    with atomic_path(p, ".pt") as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return p


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint dict, loaded with weights_only=True; clear errors for bad files."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"checkpoint not found: {p}", "give a run folder or a .pt file written by medcl")
    hint = "the file is damaged or was not written by medcl; use another checkpoint (e.g. last.pt or best.pt)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notice on foreign files
            state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise InvalidDataError(
                f"checkpoint {p} carries a pickled Python object, which medcl refuses to load (it could run code)",
                "only load checkpoints written by medcl; never disable this check for files you did not write",
            ) from None
        raise InvalidDataError(f"checkpoint {p} is corrupted: {first}", hint) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, KeyError, IndexError,
            TypeError, struct.error, UnicodeDecodeError) as exc:  # what torch's readers raise on random bytes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidDataError(f"checkpoint {p} is truncated or corrupted ({first[:160]})", hint) from None
    if not isinstance(state, dict) or "format" not in state or "model" not in state:
        raise InvalidDataError(f"{p} is not a medcl checkpoint (no 'format'/'model' keys)", hint)
    if int(state["format"]) > FORMAT:
        raise InvalidDataError(
            f"checkpoint {p} has format {state['format']}, newer than this medcl ({FORMAT})", "upgrade medcl"
        )
    return state


def resolve(run_dir_or_file: str | Path, prefer: str = "best") -> Path:
    """The checkpoint file of a run folder (best.pt, else last.pt), or the file itself."""
    p = Path(run_dir_or_file)
    if p.is_file():
        return p
    if p.is_dir():
        order = ("best.pt", "last.pt") if prefer == "best" else ("last.pt", "best.pt")
        for folder in (p / "checkpoints", p):
            for name in order:
                if (folder / name).is_file():
                    return folder / name
        raise InputNotFoundError(
            f"no checkpoint in {p} (looked for checkpoints/best.pt and checkpoints/last.pt)",
            "give the folder written by medcl pretrain/finetune (its --out)",
        )
    raise InputNotFoundError(f"run folder or checkpoint not found: {p}", "check the path")


def load_network(run_dir_or_file: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the U-Net from a checkpoint's stored config and label map; returns (net in eval mode, ckpt)."""
    from medcl_cli.config import from_dict
    from medcl_cli.models.unet import build_unet

    path = resolve(run_dir_or_file)
    ckpt = load(path)
    try:
        cfg = from_dict(ckpt["config"])
        label_map = ckpt.get("label_map") or {}
        num_classes = int(ckpt.get("num_classes") or (max(int(k) for k in label_map) + 1 if label_map else 0))
        if num_classes < 1:
            num_classes = int(ckpt["model"]["head.weight"].shape[0])
        net = build_unet(cfg.model, num_classes)
        net.load_state_dict(ckpt.get("eval_model") or ckpt["model"])  # the network validation used
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise InvalidDataError(
            f"checkpoint {path} does not match the network it describes: {str(exc).splitlines()[0][:200]}",
            "the file may come from another medcl version; re-run training",
        ) from None
    net.to(device).eval()
    return net, ckpt


def load_matching(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy the tensors of `state` whose name and shape match `module`'s; returns (loaded, skipped)."""
    own = module.state_dict()
    loaded, skipped = [], []
    take = {}
    for k, v in state.items():
        if k in own and tuple(own[k].shape) == tuple(v.shape):
            take[k] = v
            loaded.append(k)
        else:
            skipped.append(k)
    module.load_state_dict(take, strict=False)
    return loaded, skipped


# ---- RNG state as tensors and lists (so weights_only loading works) ----------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states in weights_only-safe types."""
    py = random.getstate()
    np_state = cast(tuple[Any, ...], np.random.get_state())  # legacy=True (the default): the 5-tuple
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` stored (CUDA only when present on both sides), without warnings."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    n = state["numpy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
        torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
