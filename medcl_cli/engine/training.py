"""The library side of `medcl pretrain` and `medcl finetune`: resolve the config (defaults < --config <
--set < flags, or the run's own config on --resume), relaunch under torch.distributed.run when more than
one process is asked for, run `engine.loop.fit`, and name the command that comes next.

`cli/train_options.py` only declares the options and renders what `train` returns.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcl_cli.config import Config
from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.core.runfolder import read_run_info
from medcl_cli.errors import InputNotFoundError, UsageError


@dataclass
class TrainOutcome:
    """What a training command did, for the CLI to render."""

    is_main: bool  # False on ranks other than 0 (they print nothing)
    relaunch_code: int | None = None  # set when this process started the DDP processes itself
    run_dir: Path | None = None
    best: float | None = None
    next_command: str | None = None


def nproc(value: str) -> int:
    """`--nproc-per-node`: a positive integer, or `auto` (one per CUDA device, at least one)."""
    if value == "auto":
        import torch

        return max(torch.cuda.device_count(), 1)
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--nproc-per-node must be a positive integer or auto, found '{value}'")
    return int(value)


def relaunch_args(stage: str, opts: dict[str, Any]) -> list[str]:
    """The command line of one process of a multi-process run (every option but --nproc-per-node)."""
    args = [stage]
    flags = {
        "data": "--data", "out": "--out", "steps": "--steps", "batch_size": "--batch-size",
        "image_size": "--image-size", "lr": "--lr", "device": "--device", "seed": "--seed",
        "resume": "--resume", "init_from": "--init-from", "method": "--method", "labeled": "--labeled",
    }
    for key, flag in flags.items():
        if opts.get(key) is not None:
            args += [flag, str(opts[key])]
    for f in opts.get("config") or []:
        args += ["--config", str(f)]
    for s in opts.get("sets") or []:
        args += ["--set", s]
    if opts.get("deterministic"):
        args.append("--deterministic")
    if opts.get("overwrite"):
        args.append("--overwrite")
    return args


def resolve_config(stage: str, opts: dict[str, Any]) -> tuple[Config, Path, Path]:
    """(Config, dataset path, run folder) from the options; --resume reuses the run's own config."""
    from medcl_cli.config import load_config, load_method_config, with_overrides
    from medcl_cli.methods import REGISTRY, get_info

    flags = {
        "train.steps": opts.get("steps"),
        "train.batch_size": opts.get("batch_size"),
        "data.image_size": opts.get("image_size"),
        "optim.lr": opts.get("lr"),
        "train.device": opts.get("device"),
        "train.seed": opts.get("seed"),
        "train.deterministic": True if opts.get("deterministic") else None,
        "method": opts.get("method"),
    }
    resume: Path | None = opts.get("resume")
    if resume is not None:
        if opts.get("out") is not None and Path(opts["out"]).resolve() != Path(resume).resolve():
            raise UsageError("--resume RUN continues RUN in place; do not also give a different --out")
        cfg_file = Path(resume) / "config.yaml"
        if not cfg_file.is_file():
            raise InputNotFoundError(f"cannot resume: {cfg_file} not found", "give the --out folder of a medcl run")
        keep = {k: flags[k] for k in ("train.steps", "train.device")}
        cfg = with_overrides(load_config([cfg_file], None, None), keep)
        data = opts.get("data")
        if data is None:
            data = Path(read_run_info(resume)["dataset"]["path"])
        return cfg, Path(data), Path(resume)
    cfg = with_overrides(load_method_config(opts.get("method"), opts.get("config"), opts.get("sets")), flags)
    if opts.get("data") is None:
        raise UsageError("--data is required", f"example: medcl {stage} --data DATASET --out RUN")
    if opts.get("out") is None:
        raise UsageError("--out is required", f"example: medcl {stage} --data DATASET --out runs/{stage}")
    if stage == "pretrain" and opts.get("method") is None and "pretrain" not in REGISTRY.get(cfg.method, REGISTRY["supervised"]).stages:
        pre = sorted(k for k, m in REGISTRY.items() if "pretrain" in m.stages)
        raise UsageError("pretrain needs --method", f"one of: {', '.join(pre) or '(none registered)'}")
    get_info(cfg.method, stage)
    return cfg, Path(opts["data"]), Path(opts["out"])


def train(stage: str, opts: dict[str, Any], reporter: Reporter | None = None) -> TrainOutcome:
    """Run one training command (`stage` = pretrain | finetune) with the CLI's options as a dict.

    With --nproc-per-node N > 1 outside torchrun, this process starts N copies of the command under
    torch.distributed.run and returns their exit code (`relaunch_code`); inside them (or with one
    process) it trains. Only rank 0 reports and gets a run folder back.
    """
    from medcl_cli.engine import distributed as D

    rep = reporter or NullReporter()
    n = nproc(opts.get("nproc_per_node") or "1")
    cfg, data, out = resolve_config(stage, opts)
    if n > 1 and not D.under_launcher():
        rep.log(f"starting {n} processes (torch.distributed.run)")
        return TrainOutcome(is_main=True, relaunch_code=D.relaunch(n, relaunch_args(stage, opts)))
    from medcl_cli.engine.loop import FitRequest, fit

    env = D.env_from_torchrun()
    req = FitRequest(
        cfg=cfg,
        stage=stage,
        data=data,
        out=out,
        labeled=opts.get("labeled"),
        resume=opts.get("resume") is not None,
        overwrite=bool(opts.get("overwrite")),
        init_from=opts.get("init_from"),
        command=["medcl", *sys.argv[1:]] if sys.argv and "medcl" in Path(sys.argv[0]).name else relaunch_args(stage, opts),
        dist=env,
    )
    try:
        result = fit(req, reporter if env.is_main else None)
    finally:
        D.shutdown()
    if not env.is_main:
        return TrainOutcome(is_main=False)
    if stage == "pretrain":
        nxt = finetune_hint(cfg.method, data, result.run_dir, opts.get("labeled"))
    else:
        nxt = evaluate_hint(result.run_dir, data)
    return TrainOutcome(is_main=True, run_dir=result.run_dir, best=result.best, next_command=nxt)


def finetune_hint(method: str, data: Path, run_dir: Path, labeled: str | None) -> str:
    """The `medcl finetune` command that follows a pretraining run: same method when it has a fine-tuning
    stage, and the masks the pretraining was given (every labelled patient when it was given none)."""
    from medcl_cli.methods import REGISTRY

    info = REGISTRY.get(method)
    parts = ["medcl finetune", f"--data {data}", f"--init-from {run_dir}"]
    if info is not None and "finetune" in info.stages:
        parts.append(f"--method {method}")
    if labeled is not None:
        parts.append(f"--labeled {labeled}")
    return " ".join([*parts, f"--out {run_dir}-ft"])


def evaluate_hint(run_dir: Path, data: Path) -> str:
    """The `medcl evaluate` command that follows a fine-tuning run: on the held-out split there is (test,
    else val); a dataset too small for one (a single patient) has only its training cases to score."""
    split = next((s for s in ("test", "val") if _has_split(data, s)), "train")
    return f"medcl evaluate {run_dir} --data {data} --split {split} --report"


def _has_split(data: Path, split: str) -> bool:
    from medcl_cli.data.folder import open_dataset

    try:
        return bool((open_dataset(data).cases["split"] == split).any())
    except Exception:  # noqa: BLE001 - only a hint on the next command; never fail a finished run for it
        return False
