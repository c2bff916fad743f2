"""Options and the shared body of `medcl pretrain` and `medcl finetune` (one definition, same help).

The commands stay thin: parse, resolve the config (defaults < --config < --set < flags), relaunch under
torch.distributed.run when --nproc-per-node > 1, call `engine.loop.fit`, print the run folder on stdout
and the next command on stderr. torch is imported inside functions only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from medcl_cli.cli import console

DataOpt = Annotated[
    Optional[Path], typer.Option("--data", "-i", help="Dataset folder written by medcl ingest (or medcl demo).")
]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder to create (refused if not empty).")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (train.steps).", min=1)]
BatchOpt = Annotated[
    Optional[int], typer.Option("--batch-size", help="Global batch size, split across processes (train.batch_size).", min=1)
]
ImageSizeOpt = Annotated[
    Optional[int], typer.Option("--image-size", help="Slices are resized to N x N (data.image_size).", min=8)
]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (optim.lr).")]
DeterministicOpt = Annotated[
    bool, typer.Option("--deterministic", help="Deterministic kernels: bit-identical reruns, slower.")
]
ResumeOpt = Annotated[
    Optional[Path], typer.Option("--resume", help="Continue an interrupted run folder at its last step (full state).")
]
InitFromOpt = Annotated[
    Optional[Path],
    typer.Option("--init-from", help="Start from the weights of a run folder or .pt (matching names and shapes only)."),
]
NprocOpt = Annotated[
    str, typer.Option("--nproc-per-node", help="Processes on this machine (DDP): N or auto (one per GPU).")
]
MethodOpt = Annotated[Optional[str], typer.Option("--method", "-m", help="Method key (see medcl info).")]
LabeledOpt = Annotated[
    Optional[str],
    typer.Option("--labeled", help="Labelled training patients: N (drawn with --seed), a file of patient ids, or all."),
]


def _nproc(value: str) -> int:
    from medcl_cli.errors import UsageError

    if value == "auto":
        import torch

        return max(torch.cuda.device_count(), 1)
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--nproc-per-node must be a positive integer or auto, found '{value}'")
    return int(value)


def _relaunch_args(stage: str, opts: dict[str, Any]) -> list[str]:
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


def resolve_config(stage: str, opts: dict[str, Any]) -> tuple[Any, Path, Path]:
    """(Config, dataset path, run folder) from the options; --resume reuses the run's own config."""
    from medcl_cli.config import load_config, load_method_config, with_overrides
    from medcl_cli.errors import InputNotFoundError, UsageError
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
            info = json.loads((Path(resume) / "run.json").read_text(encoding="utf-8"))
            data = Path(info["dataset"]["path"])
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


def run_training(stage: str, opts: dict[str, Any]) -> None:
    """The body of `medcl pretrain` / `medcl finetune`."""
    from medcl_cli.engine import distributed as D

    nproc = _nproc(opts.get("nproc_per_node") or "1")
    cfg, data, out = resolve_config(stage, opts)
    if nproc > 1 and not D.under_launcher():
        console.info(f"starting {nproc} processes (torch.distributed.run)")
        code = D.relaunch(nproc, _relaunch_args(stage, opts))
        if code != 0:
            raise typer.Exit(code)
        return
    from medcl_cli.engine.loop import FitRequest, fit

    env = D.env_from_torchrun()
    reporter = console.ConsoleReporter() if env.is_main else None
    req = FitRequest(
        cfg=cfg,
        stage=stage,
        data=data,
        out=out,
        labeled=opts.get("labeled"),
        resume=opts.get("resume") is not None,
        overwrite=bool(opts.get("overwrite")),
        init_from=opts.get("init_from"),
        command=["medcl", *sys.argv[1:]] if sys.argv and "medcl" in Path(sys.argv[0]).name else _relaunch_args(stage, opts),
        dist=env,
    )
    try:
        result = fit(req, reporter)
    finally:
        D.shutdown()
    if not env.is_main:
        return
    if result.best is not None:
        console.info(f"best validation Dice {result.best:.4f}")
    console.result(str(result.run_dir))
    if stage == "pretrain":
        console.info(f"next: {finetune_hint(cfg.method, data, result.run_dir, opts.get('labeled'))}")
    else:
        split = "test" if _has_split(data, "test") else "val"
        console.info(f"next: medcl evaluate {result.run_dir} --data {data} --split {split} --report")


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


def _has_split(data: Path, split: str) -> bool:
    from medcl_cli.data.folder import open_dataset

    try:
        return bool((open_dataset(data).cases["split"] == split).any())
    except Exception:  # noqa: BLE001 - only a hint on the next command; never fail a finished run for it
        return False
