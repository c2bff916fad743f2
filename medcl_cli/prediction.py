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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from medcl_cli import __version__
from medcl_cli.data.folder import write_json_atomic
from medcl_cli.data.integrity import remove_stale_temporaries
from medcl_cli.data.io import geometry, is_volume_file, read_image, strip_suffix, write_image
from medcl_cli.errors import InputNotFoundError, MedclError, OutputError, UsageError
from medcl_cli.inference import DEFAULT_BATCH, LoadedModel, predict_image, sha256_files
from medcl_cli.report import NullReporter, Reporter

FORMATS = ("nifti", "dicom-seg")
TASK = "predict"


@dataclass
class PredictInput:
    """One volume to segment: its output name, how to load it and which files it came from."""

    name: str
    kind: str  # volume | dicom
    files: list[Path]
    load: Callable[[], sitk.Image]
    display: str  # what logs show (a file name, or the pseudonymous series name for DICOM)
    info: dict[str, Any] = field(default_factory=dict)  # extra sidecar fields from the reader
    frames: list[tuple[Any, int]] = field(default_factory=list)  # DICOM: (dicom_scan.Source, 0-based frame) per slice


@dataclass
class PredictResult:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    seconds: float = 0.0


def _volume_input(path: Path) -> PredictInput:
    return PredictInput(
        name=strip_suffix(path.name), kind="volume", files=[path], load=lambda: read_image(path, finite=True), display=path.name
    )


def collect_inputs(
    paths: list[Path], workdir: Path, reporter: Reporter | None = None, exclude: Path | None = None
) -> tuple[list[PredictInput], list[tuple[str, str]]]:
    """Every volume under `paths` (files, folders of volumes, DICOM folders) and the inputs that failed.

    DICOM series are converted into `workdir` (a temporary folder the caller removes after predicting).
    Volumes under `exclude` (the output folder, when it lies inside an input folder) are not inputs, so
    a re-run never segments its own masks.
    """
    skip = exclude.resolve() if exclude is not None else None
    rep = reporter or NullReporter()
    found: list[PredictInput] = []
    failed: list[tuple[str, str]] = []
    dicom_roots: list[Path] = []
    for p in paths:
        if not p.exists():
            failed.append((str(p), "not found"))
        elif p.is_file():
            if is_volume_file(p):
                found.append(_volume_input(p))
            else:
                dicom_roots.append(p)
        else:
            vols = sorted(
                q for q in p.rglob("*")
                if is_volume_file(q) and not q.name.startswith(".tmp-")
                and not (skip is not None and q.resolve().is_relative_to(skip))
            )
            found.extend(_volume_input(q) for q in vols)
            if not vols or _has_other_files(p):
                dicom_roots.append(p)
    if dicom_roots:
        from medcl_cli.dicom_input import dicom_inputs

        dic, dic_failed = dicom_inputs(dicom_roots, workdir, rep)
        found.extend(dic)
        failed.extend(dic_failed)
    _check_unique(found)
    return found, failed


def _has_other_files(folder: Path) -> bool:
    """True when a folder holds files that are not volumes (possible DICOM next to NIfTI files)."""
    for q in folder.rglob("*"):
        if q.is_file() and not is_volume_file(q) and not q.name.startswith("."):
            return True
    return False


def _check_unique(inputs: list[PredictInput]) -> None:
    by_name: dict[str, list[str]] = {}
    for item in inputs:
        by_name.setdefault(item.name, []).append(item.display)
    dup = {k: v for k, v in by_name.items() if len(v) > 1}
    if dup:
        name, where = next(iter(dup.items()))
        raise UsageError(
            f"{len(dup)} output name(s) would be written twice, e.g. '{name}.nii.gz' from {', '.join(where[:3])}",
            "predict inputs with the same file name into different --out folders",
        )


def sidecar(model: LoadedModel, item: PredictInput, out_img: sitk.Image, fmt: str, extra: dict[str, Any]) -> dict[str, Any]:
    """What the JSON beside each mask records: model, input hash, label map and the grid written."""
    return {
        "name": item.name,
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
) -> PredictResult:
    """Segment every input into `out`; finished cases (sidecar present) are skipped unless `overwrite`."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    if fmt == "dicom-seg":
        from medcl_cli.dicom_seg import require_highdicom

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
            label = predict_image(model, image, batch_size)
            write_image(label, nii)
            extra: dict[str, Any] = {}
            if fmt == "dicom-seg":
                from medcl_cli.dicom_seg import write_dicom_seg

                seg_path = out / f"{item.name}.seg.dcm"
                write_dicom_seg(label, image, item.files, model, seg_path, item.name, allow_phi, item.frames)
                extra["dicom_seg"] = seg_path.name
            write_json_atomic(sidecar(model, item, label, fmt, extra), js)
            res.written.append(item.name)
            rep.advance(TASK, 1, case=item.name)
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


def _is_resource(exc: BaseException) -> bool:
    """Out of memory or disk: not a problem of one case, so the run stops (exit 7 from the CLI)."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "out of memory" in str(exc).lower()


def ensure_found(inputs: list[PredictInput], failed: list[tuple[str, str]], given: list[Path]) -> None:
    """Exit 3 when nothing readable was found at all."""
    if inputs:
        return
    detail = "; ".join(f"{p}: {r}" for p, r in failed[:3]) if failed else ", ".join(str(p) for p in given[:3])
    raise InputNotFoundError(
        f"no volumes or DICOM series found in the inputs ({detail})",
        "give NIfTI/NRRD/MHA files, folders of them, or DICOM folders",
    )
