"""`medcl predict`: segment volumes or DICOM series with a trained run, on each input's own grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medcl_cli.cli import console
from medcl_cli.cli.options import DeviceOpt, JsonOpt, OverwriteOpt, StrictOpt


def predict(
    run: Annotated[Path, typer.Argument(help="Run folder of medcl finetune (or a checkpoint .pt file).")],
    inputs: Annotated[
        list[Path], typer.Argument(help="NIfTI/NRRD/MHA files, folders of them, or DICOM folders. For a run on "
                                        "several channels: one file per channel (t1.nii.gz flair.nii.gz ...), "
                                        "folders of <case>_0000.. files, or DICOM study folders.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for <name>.nii.gz and <name>.json.")],
    fmt: Annotated[
        str, typer.Option("--format", help="nifti, or dicom-seg (DICOM inputs; needs medcl[dicom-seg]).")
    ] = "nifti",
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", min=1, help="Slices per forward pass (inference.batch_size, default 16).")
    ] = None,
    allow_phi: Annotated[
        bool, typer.Option("--allow-phi", help="Copy patient/study attributes into DICOM SEG outputs.")
    ] = False,
    label_series: Annotated[Optional[str], typer.Option(
        "--label-series", help="Regex on SeriesDescription: DICOM series not to segment (masks). Default: the "
                               "--label-series the run's data was ingested with; '' segments every series.")] = None,
    strict: StrictOpt = False,
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write one mask per input volume, on the input's exact grid, with a JSON sidecar.

    Each <name>.nii.gz copies the input's size, spacing, origin and direction; <name>.json records the
    label map, run id, method and the input's sha256. Outputs that exist are skipped unless --overwrite,
    so re-running a killed predict completes only the missing cases. In DICOM folders the run's label series
    (ingest's --label-series) and SEG/RTSTRUCT objects are skipped, each named on stderr. NaN/inf voxels of a
    volume are replaced by its minimum finite value (a warning, and nonfinite_replaced in the sidecar). Exit 5 when some inputs failed
    (the others are still written), 4 when every input found failed or every series was skipped, 3 when nothing
    readable was found; 4 also
    for a pretraining-only run (fine-tune it first) or, with --strict, for an input far from the run's training
    data (otherwise a warning).

    Example: medcl predict runs/ft scans/ --out preds/
    Multi-channel run: medcl predict runs/brain t1post.nii.gz flair.nii.gz t2.nii.gz --out preds/
    """
    from medcl_cli.cli.console import ConsoleReporter
    from medcl_cli.config import InferenceConfig
    from medcl_cli.core.files import private_tempdir
    from medcl_cli.engine.device import describe, resolve_device
    from medcl_cli.errors import PartialSuccess
    from medcl_cli.predict.discover import find_inputs
    from medcl_cli.predict.inference import load_model
    from medcl_cli.predict.runner import predict_all

    reporter = ConsoleReporter()
    dev = resolve_device(device or "auto")
    model = load_model(run, dev)  # first: a wrong run folder fails before any DICOM is converted
    from medcl_cli.predict.fit import require_trained_head

    require_trained_head(model.segmentation_trained, str(run), model.method)
    if model.num_channels > 1 and fmt == "dicom-seg":
        from medcl_cli.errors import UsageError

        raise UsageError(f"--format dicom-seg is not available for a run on {model.num_channels} channels "
                         f"({', '.join(model.channel_names)})", "use the default --format nifti")
    with private_tempdir("medcl-predict-") as work:
        found = find_inputs(model, list(inputs), work, reporter, exclude=out, label_series=label_series)
        console.info(f"device: {describe(dev)}; {len(found.inputs)} volume(s) to segment")
        res = predict_all(
            model, found.inputs, out, overwrite=overwrite, fmt=fmt,
            batch_size=batch_size or InferenceConfig().batch_size, allow_phi=allow_phi, reporter=reporter, strict=strict,
        )
    res.failed = found.failed + res.failed
    if as_json:
        console.result(json.dumps({"out": str(out), "written": res.written, "skipped": res.skipped,
                                   "skipped_series": found.skipped,
                                   "failed": [{"input": i, "reason": r} for i, r in res.failed]}, indent=2))
    else:
        labels = f", {len(found.skipped)} label series skipped" if found.skipped else ""
        console.result(
            f"{len(res.written)} written, {len(res.skipped)} already present{labels}, {len(res.failed)} failed -> {out}"
        )
        if res.skipped:
            console.info("existing outputs were kept; give --overwrite to recompute them")
    if res.failed:
        shown = "; ".join(f"{i}: {r}" for i, r in res.failed[:3]) + (" ..." if len(res.failed) > 3 else "")
        if not res.written and not res.skipped:  # nothing at all was predicted: no partial success
            from medcl_cli.errors import InvalidDataError

            raise InvalidDataError(f"no input could be segmented ({len(res.failed)} failed): {shown}",
                                   "fix the inputs named above and re-run")
        raise PartialSuccess(
            f"{len(res.failed)} input(s) failed: {shown}", "fix or remove them and re-run; finished cases are skipped"
        )
