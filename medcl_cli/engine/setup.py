"""What the fit loop does before and around the steps: seeding, building the method (with --init-from
weights), and turning the training state into a checkpoint dict and back (keys in docs/architecture.md).
"""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medcl_cli import __version__
from medcl_cli.config import Config, to_dict
from medcl_cli.core.protocol import DataSpec, eval_net
from medcl_cli.core.report import Reporter
from medcl_cli.data.dataset import SliceSet
from medcl_cli.engine import checkpoint as ckpt_io
from medcl_cli.engine import distributed as D
from medcl_cli.engine.device import describe
from medcl_cli.errors import InvalidDataError
from medcl_cli.methods import MethodInfo, get_info, load_method_class
from medcl_cli.models.unet import build_unet


def seed_everything(seed: int, deterministic: bool, rep: Reporter) -> None:
    """Seed python, numpy and torch; with `deterministic`, ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        rep.log(
            "deterministic mode: bit-identical reruns on the same machine, slower, and some CUDA ops may "
            "refuse to run",
            "warning",
        )
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def versions() -> dict[str, str]:
    """Versions as plain strings (importing monai only to read its version would cost seconds)."""
    import importlib.metadata

    try:
        monai_version = importlib.metadata.version("monai")
    except importlib.metadata.PackageNotFoundError:
        monai_version = "not installed"
    return {
        "medcl": __version__,
        "torch": str(torch.__version__),
        "monai": monai_version,
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def with_input_channels(cfg: Config, slices: SliceSet, rep: Reporter) -> Config:
    """`cfg` with model.in_channels = the dataset's channel count (the network reads every sequence)."""
    import dataclasses

    n = slices.channels
    if n != int(cfg.model.in_channels):
        if int(cfg.model.in_channels) != 1:
            rep.log(f"model.in_channels {cfg.model.in_channels} replaced by the dataset's {n} channel(s)", "warning")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_channels=n))
    if n > 1:
        rep.log(f"input channels: {n} ({', '.join(slices.channel_names)})")
    return cfg


def check_init_channels(state: dict[str, Any], source: Path, names: list[str]) -> None:
    """--init-from a run trained on another number of channels is refused: its first convolution cannot
    read this dataset's input (copying the rest would silently drop what the encoder learnt first)."""
    theirs = state.get("channel_names")
    if theirs is None:
        theirs = ["image"] * int(((state.get("config") or {}).get("model") or {}).get("in_channels", 1))
    if len(theirs) != len(names):
        raise InvalidDataError(
            f"--init-from {source}: that run was trained on {len(theirs)} input channel(s) "
            f"({', '.join(map(str, theirs))}), this dataset has {len(names)} ({', '.join(names)})",
            "initialise from a run on a dataset ingested with the same --channels, or train without --init-from",
        )


def data_spec(slices: SliceSet, stage: str, world_size: int = 1) -> DataSpec:
    """What a method may know about the data (core/protocol.py), as the loop gives it."""
    from medcl_cli.data.profile import categorical_meta

    return DataSpec(
        num_classes=slices.num_classes, meta_cardinality=slices.meta_cardinality, stage=stage, world_size=world_size,
        meta_categorical=categorical_meta(slices.meta_names, slices.meta_values, slices.meta, slices.case),
    )


def build_method(
    cfg: Config, stage: str, slices: SliceSet, env: D.DistEnv, device: torch.device, init_from: Path | None, rep: Reporter
) -> tuple[nn.Module, MethodInfo]:
    """The method module around a fresh U-Net (same initial weights on every rank), on `device`."""
    info = get_info(cfg.method, stage)
    cls = load_method_class(cfg.method)
    torch.manual_seed(cfg.train.seed)
    net = build_unet(cfg.model, slices.num_classes)
    if init_from is not None:
        load_init(net, init_from, rep, slices.channel_names)
    method = cls(net, cfg, data_spec(slices, stage, env.world)).to(device)
    for note in getattr(method, "notes", ()):  # what the method chose from the data (gcl: its meta labels)
        rep.log(str(note))
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    if env.enabled:
        method = D.convert_sync_batchnorm(method, device)
        D.broadcast_module(method)
    return method, info


def load_init(net: nn.Module, source: Path, rep: Reporter, channel_names: list[str] | None = None) -> None:
    """--init-from: copy the weights whose name and shape match; report what was loaded and skipped."""
    path = ckpt_io.resolve(source)
    state = ckpt_io.load(path)
    if channel_names is not None:
        check_init_channels(state, source, channel_names)
    weights = state.get("eval_model") or state["model"]
    loaded, skipped = ckpt_io.load_matching(net, weights)
    if not loaded:
        raise InvalidDataError(
            f"--init-from {source}: no weight of {path.name} matches this network (names or shapes differ)",
            "check model.channels / model.spatial_dims against the run you initialise from",
        )
    own = set(net.state_dict())
    rep.log(
        f"init from {path}: loaded {len(loaded)}/{len(own)} tensors"
        + (f", skipped {len(skipped)} ({', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''})" if skipped else "")
    )


def trains_segmentation(method: nn.Module) -> bool:
    """Whether the method trains the segmentation head on masks (then the loop validates it, and predict /
    evaluate accept the run). semicl uses masks for its local contrast only (`validates = False`)."""
    return "labeled" in set(getattr(method, "needs", {"labeled"})) and bool(getattr(method, "validates", True))


def checkpoint_state(
    method: nn.Module, opt: torch.optim.Optimizer, scaler: Any, step: int, best: float | None, cfg: Config,
    stage: str, slices: SliceSet, full: bool, profile: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict; `full` adds what resuming needs (optimizer, scaler, RNG); `profile` is the
    training data's profile (data/profile.py) that predict and evaluate compare inputs with."""
    net = method.get_submodule("net")  # the registered U-Net, typed nn.Module
    state: dict[str, Any] = {
        "format": ckpt_io.FORMAT,
        "method": cfg.method,
        "stage": stage,
        "model": net.state_dict(),
        "method_state": {k: v for k, v in method.state_dict().items() if not k.startswith("net.")},
        "scheduler": {"kind": cfg.optim.schedule, "step": step},
        "step": step,
        "best_metric": {"name": "val_dice", "value": best},
        "config": to_dict(cfg),
        "label_map": {str(k): v for k, v in slices.folder.labels.items()},
        "channel_names": list(slices.channel_names),
        "num_classes": slices.num_classes,
        "preprocessing": {
            "image_size": cfg.data.image_size,
            "resize": cfg.data.resize,
            "normalize": cfg.data.normalize,
        },
        "versions": versions(),
        "segmentation_trained": trains_segmentation(method),
    }
    if profile:
        state["data_profile"] = profile
    ev = eval_net(method)
    if ev is not net:
        state["eval_model"] = ev.state_dict()
    if full:
        state["optimizer"] = opt.state_dict()
        state["scaler"] = scaler.state_dict()
        state["rng"] = ckpt_io.rng_state()
    return state


def restore_state(
    state: dict[str, Any], method: nn.Module, opt: torch.optim.Optimizer, scaler: Any, device: torch.device
) -> tuple[int, float | None]:
    """Load a full checkpoint into the live objects; returns (step, best validation Dice)."""
    try:
        method.get_submodule("net").load_state_dict(state["model"])
        expected = {k for k in method.state_dict() if not k.startswith("net.")}
        got = set(state.get("method_state", {}))
        if expected != got:
            raise KeyError(f"method state keys differ: missing {sorted(expected - got)[:3]}, extra {sorted(got - expected)[:3]}")
        method.load_state_dict(state.get("method_state", {}), strict=False)
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise InvalidDataError(
            f"cannot resume: the checkpoint does not match this method/network ({str(exc).splitlines()[0][:200]})",
            "resume with the same medcl version and config, or start a new run with --init-from",
        ) from None
    ckpt_io.set_rng_state(state["rng"])
    best = (state.get("best_metric") or {}).get("value")
    return int(state["step"]), (None if best is None else float(best))


def resume_rank_rng(saved: list[dict[str, Any]] | None, env: Any, fallback_seed: int) -> None:
    """This rank's generators from a DDP checkpoint's `rng_ranks`; a checkpoint from another number of
    processes (or from before medcl kept every rank's state) gets a fresh stream from `fallback_seed`."""
    if saved is not None and len(saved) == env.world:
        ckpt_io.set_rng_state(saved[env.rank])
    else:
        torch.manual_seed(fallback_seed)


def run_info(
    req: Any, device: torch.device, dtype: torch.dtype, slices: SliceSet, patients: list[str], info: MethodInfo,
    workers: int, cache_s: float, segmentation_trained: bool = True,
) -> dict[str, Any]:
    """The run.json fields known at the start, the training data's profile (data/profile.py) included."""
    folder = slices.folder
    from medcl_cli.data.profile import dataset_profile
    from medcl_cli.engine.runs import now

    return {
        "medcl_version": __version__,
        "command": req.command,
        "stage": req.stage,
        "method": info.key,
        "device": describe(device),
        "precision": str(dtype).replace("torch.", ""),
        "world_size": req.dist.world,
        "seed": req.cfg.train.seed,
        "deterministic": req.cfg.train.deterministic,
        "versions": versions(),
        "dataset": {
            "path": str(Path(folder.root).resolve()),
            "name": folder.info.get("name", folder.root.name),
            "fingerprint": folder.fingerprint(),
            "cases": len(slices.case_ids),
            "slices": int(len(slices.case)),
            "splits": folder.split_counts(),  # {split: {cases, patients}}
        },
        "data_profile": dataset_profile(folder) if req.dist.is_main else None,  # only rank 0 writes run.json
        "segmentation_trained": segmentation_trained,
        "labeled_patients": patients,
        "init_from": str(req.init_from) if req.init_from else None,
        "data_workers": workers,
        "slice_cache": str(slices.cache_dir),
        "slice_cache_s": round(cache_s, 3),
        "started": now(),
    }
