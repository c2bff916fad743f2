"""Options shared by several commands, as `Annotated` types (one definition, same help everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--config", "-c", help="YAML config file(s) over the defaults; later files win."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override one config key, e.g. --set train.steps=200 (repeatable)."),
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", "-d", help="auto | cpu | cuda | cuda:N | mps (default auto).")
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (always recorded in run.json).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing, non-empty output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Refuse (exit 4) input whose modality, channel count or in-plane spacing is far "
                                  "from the run's training data, instead of warning."),
]
