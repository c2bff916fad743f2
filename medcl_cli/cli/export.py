"""`medcl export`: a dataset folder as an nnU-Net v2 raw dataset or a MONAI decathlon datalist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medcl_cli.cli import console
from medcl_cli.cli.options import JsonOpt, OverwriteOpt


def export(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder written by medcl ingest.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="nnunet | monai.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="nnunet: the nnUNet_raw folder; monai: the output folder.")],
    dataset_id: Annotated[int, typer.Option("--dataset-id", help="nnunet: the three-digit dataset id.")] = 501,
    name: Annotated[
        Optional[str], typer.Option("--name", help="nnunet: dataset name (default: the dataset's name).")
    ] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy files instead of hard-linking them.")] = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a dataset to nnU-Net v2 (DatasetXXX_Name/ with dataset.json, imagesTr, labelsTr, imagesTs,
    splits_final.json) or MONAI (decathlon datalist.json with training/validation/test lists).

    Files are hard-linked when possible (else copied); the dataset itself is never modified. Only labelled
    train/val cases go to nnU-Net's imagesTr; test-split cases go to imagesTs.

    Example: medcl export data/ --format nnunet --out nnUNet_raw --dataset-id 501 --name Heart
    """
    from medcl_cli.export.formats import export_dataset

    result = export_dataset(
        dataset, fmt, out, dataset_id=dataset_id, name=name, overwrite=overwrite, copy=copy,
        reporter=console.ConsoleReporter(),
    )
    if as_json:
        console.result(
            json.dumps(
                {
                    "format": result.format,
                    "path": str(result.path),
                    "datalist": str(result.datalist) if result.datalist else None,
                    "counts": result.counts,
                    "linked": result.linked,
                    "copied": result.copied,
                    "skipped_unlabeled": result.skipped_unlabeled,
                },
                indent=2,
            )
        )
        return
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    console.info(f"{result.linked} file(s) hard-linked, {result.copied} copied; {counts}")
    console.result(str(result.datalist or result.path))
    console.info("next:")
    for line in result.next_steps:
        console.info(f"  {line}")


setattr(export, "no_args_is_help", True)  # a function attribute cli/commands.py reads with getattr
