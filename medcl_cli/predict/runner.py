"""`medcl predict` as a library: find the inputs, segment each one, write `<name>.nii.gz` + `<name>.json`.

Inputs are NIfTI/NRRD/MHA files, folders of them, or DICOM folders (read through the ingest code, which
names each series pseudonymously). Each output is written atomically and its JSON sidecar last, so the
sidecar marks a finished case: a killed run re-started with the same command completes only the missing
cases (nnU-Net's `--continue_prediction`, made the default). One failing input never stops the others.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from medcl_cli import __version__
from medcl_cli.core.files import remove_stale_temporaries, write_json_atomic
from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.io import (
    geometry,
    write_image,
)
from medcl_cli.errors import MedclError, OutputError, UsageError
from medcl_cli.predict.fit import NotFitError, check_fit, require_trained_head
from medcl_cli.predict.inference import (
    DEFAULT_BATCH,
    LoadedModel,
    predict_image,
    sha256_files,
)
from medcl_cli.predict.item import PredictInput

FORMATS = ("nifti", "dicom-seg")
TASK = "predict"


@dataclass
class PredictResult:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    seconds: float = 0.0


def sidecar(model: LoadedModel, item: PredictInput, out_img: sitk.Image, fmt: str, extra: dict[str, Any]) -> dict[str, Any]:
    """What the JSON beside each mask records: model, input hash, label map and the grid written."""
    return {
        "name": item.name,
        "input": item.given,  # the path as given on the command line (a DICOM series: the folder holding it)
        "input_kind": item.kind,
        "input_sha256": sha256_files(item.files),
        "input_files": len(item.files),
        "label_map": {str(k): v for k, v in sorted(model.label_map.items())},
        "run_id": model.run_id,
        "method": model.method,
        "stage": model.stage,
        "checkpoint": model.checkpoint.name,
        "checkpoint_step": model.extra.get("step"),
        "preprocessing": model.preprocessing,
        "postprocessing": "none",
        "format": fmt,
        "geometry": geometry(out_img),
        "medcl_version": __version__,
        **item.info,
        **extra,
    }


def predict_all(
    model: LoadedModel,
    inputs: list[PredictInput],
    out: Path,
    overwrite: bool = False,
    fmt: str = "nifti",
    batch_size: int = DEFAULT_BATCH,
    allow_phi: bool = False,
    reporter: Reporter | None = None,
    strict: bool = False,
) -> PredictResult:
    """Segment every input into `out`; finished cases (sidecar present) are skipped unless `overwrite`.

    Each input is compared with the run's training data (predict/fit.py): a mismatch is a warning in the
    log and the sidecar (`fit_warnings`), or with `strict` a NotFitError that stops the run (exit 4)."""
    require_trained_head(model.segmentation_trained, str(model.run_dir), model.method)
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    if fmt == "dicom-seg":
        from medcl_cli.predict.seg_writer import require_highdicom

        require_highdicom()
        not_dicom = [i.display for i in inputs if i.kind != "dicom"]
        if not_dicom:
            raise UsageError(
                f"--format dicom-seg needs DICOM inputs, but {len(not_dicom)} input(s) are volumes, e.g. {not_dicom[0]}",
                "use the default --format nifti for NIfTI/NRRD/MHA inputs",
            )
    rep = reporter or NullReporter()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out}: {exc.strerror}", "choose a writable --out") from None
    if not os.access(out, os.W_OK):
        raise OutputError(f"output folder {out} is not writable", "choose a writable --out")
    remove_stale_temporaries(out)  # what a killed earlier run's interrupted writes left
    res = PredictResult()
    t0 = time.perf_counter()
    rep.start(TASK, len(inputs))
    for item in inputs:
        nii, js = out / f"{item.name}.nii.gz", out / f"{item.name}.json"
        if js.is_file() and nii.is_file() and not overwrite:
            res.skipped.append(item.name)
            rep.advance(TASK, 1, case=item.name, status="exists")
            continue
        try:
            image = item.load()
            from medcl_cli.data.profile import image_profile

            extra: dict[str, Any] = {}
            fixed = item.info.get("nonfinite_replaced")
            if fixed:  # NaN/inf voxels replaced as ingest does (predict/inputs.py load_volume); in the sidecar too
                rep.log(f"{item.display}: {_nonfinite_text(fixed)}", "warning")
            notes = check_fit(model.profile, image_profile(image, item.info.get("modality")), item.display, strict)
            if notes:
                rep.log(f"{item.display}: {'; '.join(notes)} (the mask may be poor; --strict refuses it)", "warning")
                extra["fit_warnings"] = notes
            label = predict_image(model, image, batch_size)
            write_image(label, nii)
            if fmt == "dicom-seg":
                from medcl_cli.predict.seg_writer import write_dicom_seg

                seg_path = out / f"{item.name}.seg.dcm"
                # the SEG's patient is the series' UID pseudonym: unique per series, unlike a readable name
                write_dicom_seg(label, image, item.files, model, seg_path, item.pseudonym or item.name, allow_phi,
                                item.frames)
                extra["dicom_seg"] = seg_path.name
            write_json_atomic(sidecar(model, item, label, fmt, extra), js)
            res.written.append(item.name)
            rep.advance(TASK, 1, case=item.name)
        except NotFitError:
            raise
        except MedclError as exc:
            res.failed.append((item.display, exc.message))
            rep.log(f"{item.display}: {exc.message}", "warning")
            rep.advance(TASK, 1, case=item.name, status="failed")
        except (RuntimeError, ValueError, OSError) as exc:  # a reader/writer failure of one case
            if _is_resource(exc):
                raise
            reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
            res.failed.append((item.display, reason))
            rep.log(f"{item.display}: {reason}", "warning")
            rep.advance(TASK, 1, case=item.name, status="failed")
    rep.finish(TASK)
    res.seconds = time.perf_counter() - t0
    return res


def _nonfinite_text(fixed: dict[str, Any]) -> str:
    """The warning for the NaN/inf voxels replaced in an input (per channel for a multi-channel case)."""
    from medcl_cli.data.volume_frames import nonfinite_note

    if "nan" in fixed:
        return nonfinite_note(fixed)
    return "; ".join(f"{ch}: {nonfinite_note(c)}" for ch, c in fixed.items())


def _is_resource(exc: BaseException) -> bool:
    """Out of memory or disk: not a problem of one case, so the run stops (exit 7 from the CLI)."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "out of memory" in str(exc).lower()


