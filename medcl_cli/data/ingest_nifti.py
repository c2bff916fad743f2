"""NIfTI/NRRD/MHA volumes to cases, with labels matched by case name (nnU-Net `_0000` suffix tolerated).

Volumes are re-written through SimpleITK (so headers carry nothing but geometry) and verified; a label on
another grid, with non-integer values, or a 4D volume is an error for that case, with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.dicom.cases import ReportRow
from medcl_cli.data.dicom.volume import write_volume
from medcl_cli.data.io import (
    grid_difference,
    is_volume_file,
    read_image,
    same_grid,
    strip_suffix,
)
from medcl_cli.errors import MedclError

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class NiftiCase:
    case_id: str
    name: str  # file stem without the channel suffix: what --labels, --meta-csv and --split-file match
    image: Path
    label: Path | None
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    label_values: list[int]


def case_name(path: Path) -> str:
    """`patient001_0000.nii.gz` -> `patient001` (nnU-Net channel suffix removed)."""
    stem = strip_suffix(path.name)
    return re.sub(r"_0000$", "", stem)


def _as_3d(img: sitk.Image) -> sitk.Image:
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(f"{img.GetNumberOfComponentsPerPixel()} components per voxel (vector/RGB image); "
                         "write one scalar channel per file")
    if img.GetDimension() == 2:
        return sitk.JoinSeries([img])
    if img.GetDimension() == 4:
        if img.GetSize()[3] != 1:
            raise ValueError(f"4D volume with {img.GetSize()[3]} time points; split it into 3D files first")
        return img[:, :, :, 0]
    return img


def _label_index(labels_dir: Path | None) -> dict[str, Path]:
    if labels_dir is None:
        return {}
    return {case_name(p): p for p in sorted(labels_dir.rglob("*")) if is_volume_file(p)}


def convert_volume(path: Path, label: Path | None, case_id: str, workdir: Path) -> tuple[str, str, NiftiCase | None]:
    """(status, reason, case) for one volume and its label; runs in a worker process."""
    name = case_name(path)
    try:
        img = _as_3d(read_image(path, finite=True))
    except (MedclError, ValueError, RuntimeError) as exc:
        return "failed:unreadable", str(exc).replace(str(path), path.name), None  # the row names the file already
    label_img = None
    if label is not None:
        try:
            label_img = _as_3d(read_image(label))
        except (MedclError, ValueError, RuntimeError) as exc:
            return "failed:label", f"label {label.name}: {exc}", None
        if not same_grid(img, label_img, tol=1e-3):
            return "failed:label-grid", f"label {label.name} is on another grid: {grid_difference(img, label_img)}", None
        arr = sitk.GetArrayFromImage(label_img)
        if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))):
            return "failed:label-values", f"label {label.name} has non-integer values", None
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            return "failed:label-values", f"label {label.name} has values outside 0..65535", None
        arr = arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.uint16)
        label_img = sitk.GetImageFromArray(arr)
        label_img.CopyInformation(img)
    image_path = write_volume(_clean(img), workdir / "images" / f"{case_id}.nii.gz")
    label_path = None
    values: list[int] = []
    if label_img is not None:
        label_path = write_volume(label_img, workdir / "labels" / f"{case_id}.nii.gz")
        values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label_img))]
    return "ok", "", NiftiCase(case_id, name, image_path, label_path, tuple(img.GetSize()), tuple(img.GetSpacing()),
                               values)


def ingest_nifti(
    volumes: list[Path],
    labels_dir: Path | None,
    workdir: Path,
    taken: set[str],
    display: Callable[[str], str],
    reporter: Reporter | None = None,
    workers: int = 1,
) -> tuple[list[NiftiCase], list[ReportRow]]:
    """Write every volume (and its label) into workdir/images and workdir/labels, `workers` at a time."""
    rep = reporter or NullReporter()
    labels = _label_index(labels_dir)
    cases: list[NiftiCase] = []
    rows: list[ReportRow] = []
    jobs: list[tuple[ReportRow, Path, Path | None, str]] = []
    for path in volumes:
        name = case_name(path)
        row = ReportRow(display(str(path)), "volume", "ok")
        rows.append(row)
        case_id = _SAFE.sub("_", name).strip("._-") or "case"  # no leading dash: ids are file names users type
        if case_id in taken:
            row.status, row.reason = "failed:duplicate-name", f"another input already gave case '{case_id}'"
            continue
        taken.add(case_id)
        jobs.append((row, path, labels.get(name), case_id))
    if not jobs:
        return cases, rows
    rep.start("converting volumes", len(jobs))
    paths, labs, ids = [j[1] for j in jobs], [j[2] for j in jobs], [j[3] for j in jobs]
    dirs = [workdir] * len(jobs)
    if workers > 1 and len(jobs) > 2:
        from concurrent.futures import ProcessPoolExecutor

        from medcl_cli.data.dicom.scan import _context

        with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
            results = list(_advancing(pool.map(convert_volume, paths, labs, ids, dirs, chunksize=4), rep))
    else:
        results = list(_advancing(map(convert_volume, paths, labs, ids, dirs), rep))
    for (row, _, _, case_id), (status, reason, case) in zip(jobs, results):
        row.status, row.reason = status, reason
        if case is None:
            taken.discard(case_id)
        else:
            row.case_id = case_id
            cases.append(case)
    rep.finish("converting volumes")
    return cases, rows


def _advancing(it: Iterable[tuple[str, str, NiftiCase | None]], rep: Reporter) -> Iterator[tuple[str, str, NiftiCase | None]]:
    for item in it:
        rep.advance("converting volumes")
        yield item


def _clean(img: sitk.Image) -> sitk.Image:
    """A copy with geometry only: no metadata dictionary (descrip, aux_file, ...) is carried over."""
    out = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(img))
    out.CopyInformation(img)
    return out
