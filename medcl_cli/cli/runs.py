"""`medcl runs`: the run folders under a folder, with method, dataset, labelled count, Dice and status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medcl_cli.cli import console
from medcl_cli.cli.options import JsonOpt


def runs(
    folder: Annotated[Path, typer.Argument(help="Folder searched recursively for run folders (run.json).")] = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """List the runs under FOLDER (every folder holding a run.json, recursively), oldest first: stage,
    method, dataset, labelled patients, best validation Dice, the mean foreground Dice of each
    `medcl evaluate` folder inside the run, duration and status (completed, running, failed, interrupted).

    Example: medcl runs runs/ --json
    """
    from medcl_cli.catalog.run_index import find_runs, table_lines, to_json

    rows = find_runs(folder)
    if as_json:
        console.result(json.dumps(to_json(rows), indent=2))
        return
    if not rows:
        console.info(f"no run folders (run.json) under {folder}")
        return
    for line in table_lines(rows):
        console.result(line)
