"""`medcl export`: one entry point over the formats (nnU-Net raw dataset, MONAI datalist)."""

from __future__ import annotations

from pathlib import Path

from medcl_cli.core.report import Reporter
from medcl_cli.export.nnunet import export_nnunet
from medcl_cli.export.staging import ExportResult

FORMATS = ("nnunet", "monai")


def export_dataset(
    dataset: str | Path,
    fmt: str,
    out: str | Path,
    dataset_id: int = 501,
    name: str | None = None,
    overwrite: bool = False,
    copy: bool = False,
    reporter: Reporter | None = None,
) -> ExportResult:
    """Dispatch on `fmt` (nnunet | monai)."""
    if fmt == "nnunet":
        return export_nnunet(dataset, out, dataset_id, name, overwrite, copy, reporter)
    if fmt == "monai":
        from medcl_cli.export.monai_datalist import export_monai

        return export_monai(dataset, out, overwrite, copy, reporter)
    from medcl_cli.errors import unknown_choice

    raise unknown_choice("format", fmt, FORMATS)
