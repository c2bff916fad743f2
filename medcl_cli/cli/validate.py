"""`medcl validate`: re-check a dataset folder and list every problem at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medcl_cli.cli import console
from medcl_cli.cli.options import JsonOpt


def validate(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder written by medcl ingest.")],
    as_json: JsonOpt = False,
) -> None:
    """Check a dataset folder: files present and readable, label grids and values against dataset.json,
    split values, one meta.csv row per slice, no NaN/inf voxels. Lists every problem; exit 4 when any.

    Example: medcl validate data/
    """
    from medcl_cli.data.validate import problems_error, validate_dataset

    res = validate_dataset(dataset, console.ConsoleReporter())
    if as_json:
        console.result(json.dumps({"dataset": str(res.root), "cases": res.cases, "ok": res.ok,
                                   "problems": [p.__dict__ for p in res.problems]}, indent=2))
    else:
        for p in res.problems:
            console.result(f"{p.case_id or '-'}\t{p.check}\t{p.message}")
        if res.ok:
            console.result(f"{res.root}: {res.cases} case(s), no problems")
    if not res.ok:
        raise problems_error(res)
