"""The option set of `medcl pretrain` and `medcl finetune`, declared once: `training_command(stage, doc)`
builds either command. The work is `engine.training.train`; this module renders its outcome (the run
folder on stdout, the next command on stderr). torch is imported inside the command only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from medcl_cli.cli import console
from medcl_cli.cli.options import ConfigOpt, DeviceOpt, OverwriteOpt, SeedOpt, SetOpt

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



def training_command(stage: str, doc: str) -> Callable[..., None]:
    """The Typer command function of one training stage; both stages share this signature and its help."""

    def command(
        data: DataOpt = None,
        out: OutOpt = None,
        method: MethodOpt = None,
        labeled: LabeledOpt = None,
        init_from: InitFromOpt = None,
        steps: StepsOpt = None,
        batch_size: BatchOpt = None,
        image_size: ImageSizeOpt = None,
        lr: LrOpt = None,
        device: DeviceOpt = None,
        seed: SeedOpt = None,
        config: ConfigOpt = None,
        sets: SetOpt = None,
        deterministic: DeterministicOpt = False,
        resume: ResumeOpt = None,
        overwrite: OverwriteOpt = False,
        nproc_per_node: NprocOpt = "1",
    ) -> None:
        opts = {k: v for k, v in locals().items() if k != "stage"}
        from medcl_cli.engine.training import train

        outcome = train(stage, opts, console.ConsoleReporter())
        if outcome.relaunch_code is not None:
            if outcome.relaunch_code != 0:
                raise typer.Exit(outcome.relaunch_code)
            return
        if not outcome.is_main:
            return
        if outcome.best is not None:
            console.info(f"best validation Dice {outcome.best:.4f}")
        console.result(str(outcome.run_dir))
        if outcome.next_command:
            console.info(f"next: {outcome.next_command}")

    command.__name__ = command.__qualname__ = stage
    command.__doc__ = doc
    return command
