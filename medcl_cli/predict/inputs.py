"""Finding the inputs of `medcl predict`: volume files, folders of them, and DICOM folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import SimpleITK as sitk

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.io import is_volume_file, strip_suffix
from medcl_cli.errors import InputNotFoundError, InvalidDataError, UsageError
from medcl_cli.predict.item import PredictInput


def output_name(path: Path) -> str:
    """A volume's output name: its file name without the extension, and without nnU-Net's channel suffix
    `_0000` (`case_0000.nii.gz` -> `case`, as nnU-Net names its predictions)."""
    stem = strip_suffix(path.name)
    return stem[:-5] if stem.endswith("_0000") and len(stem) > 5 else stem


def load_volume(path: Path, info: dict[str, Any], channel: str | None = None) -> sitk.Image:
    """A volume input, its NaN/inf voxels replaced by its minimum finite value as ingest does
    (data/volume_frames.py); what was replaced goes into `info["nonfinite_replaced"]` (the sidecar), under
    the channel's name for one channel of a multi-channel case. A volume without a finite voxel fails."""
    from medcl_cli.data.volume_frames import FramesError, read_repaired

    try:
        image, counts = read_repaired(path)
    except FramesError as exc:
        raise InvalidDataError(f"{path.name}: {exc}", "export the volume again with real intensities") from None
    if counts:
        if channel is None:
            info["nonfinite_replaced"] = counts
        else:
            info.setdefault("nonfinite_replaced", {})[channel] = counts
    return image


def _volume_input(path: Path) -> PredictInput:
    item = PredictInput(name=output_name(path), kind="volume", files=[path], load=lambda: sitk.Image(),
                        display=path.name, given=str(path))
    def load() -> sitk.Image:
        item.info.pop("nonfinite_replaced", None)
        return load_volume(path, item.info)

    item.load = load
    return item


def collect_inputs(
    paths: list[Path], workdir: Path, reporter: Reporter | None = None, exclude: Path | None = None,
    label_series: str | None = None, skipped: list[str] | None = None,
) -> tuple[list[PredictInput], list[tuple[str, str]]]:
    """Every volume under `paths` (files, folders of volumes, DICOM folders) and the inputs that failed.

    DICOM series are converted into `workdir` (a temporary folder the caller removes after predicting);
    the label series (`label_series`, a regex on SeriesDescription) and SEG/RTSTRUCT objects are not, and
    are listed in `skipped`. Volumes under `exclude` (the output folder, when it lies inside an input
    folder) are not inputs, so a re-run never segments its own masks.
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
        from medcl_cli.predict.dicom_inputs import dicom_inputs

        dic, dic_failed = dicom_inputs(dicom_roots, workdir, rep, label_series, skipped)
        found.extend(dic)
        failed.extend(dic_failed)
    _keep_suffix_where_it_collides(found)
    check_unique(found)
    return found, failed


def _keep_suffix_where_it_collides(inputs: list[PredictInput]) -> None:
    """`case_0000.nii.gz` next to a `case.nii.gz` (an nnU-Net raw folder with imagesTr/ and labelsTr/):
    the first keeps its full stem rather than both being refused."""
    count: dict[str, int] = {}
    for item in inputs:
        count[item.name] = count.get(item.name, 0) + 1
    for item in inputs:
        if item.kind == "volume" and count[item.name] > 1 and len(item.files) == 1:
            item.name = strip_suffix(item.files[0].name)


def _has_other_files(folder: Path) -> bool:
    """True when a folder holds files that are not volumes (possible DICOM next to NIfTI files)."""
    for q in folder.rglob("*"):
        if q.is_file() and not is_volume_file(q) and not q.name.startswith("."):
            return True
    return False


def check_unique(inputs: list[PredictInput]) -> None:
    by_name: dict[str, list[str]] = {}
    for item in inputs:
        by_name.setdefault(item.name, []).append(item.given or item.display)
    dup = {k: v for k, v in by_name.items() if len(v) > 1}
    if dup:
        name, where = next(iter(dup.items()))
        raise UsageError(
            f"{len(dup)} output name(s) would be written twice, e.g. '{name}.nii.gz' from {', '.join(where[:3])}",
            "predict inputs with the same file name into different --out folders",
        )


def ensure_found(inputs: list[PredictInput], failed: list[tuple[str, str]], given: list[Path]) -> None:
    """Exit 3 when nothing readable was found at all."""
    if inputs:
        return
    detail = "; ".join(f"{p}: {r}" for p, r in failed[:3]) if failed else ", ".join(str(p) for p in given[:3])
    raise InputNotFoundError(
        f"no volumes or DICOM series found in the inputs ({detail})",
        "give NIfTI/NRRD/MHA files, folders of them, or DICOM folders",
    )
