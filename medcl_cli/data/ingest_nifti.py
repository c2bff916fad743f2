"""NIfTI/NRRD/MHA volumes to cases, with labels matched by case name (nnU-Net `_0000` suffix tolerated).

Volumes are re-written through SimpleITK (so headers carry nothing but geometry) and verified; a label on
another grid, with non-integer values, or a 4D volume is an error for that case, with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medcl_cli.data.dicom import ReportRow
from medcl_cli.data.dicom_volume import write_volume
from medcl_cli.data.io import grid_difference, is_volume_file, read_image, same_grid, strip_suffix
from medcl_cli.errors import MedclError
from medcl_cli.report import NullReporter, Reporter

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


def ingest_nifti(
    volumes: list[Path],
    labels_dir: Path | None,
    workdir: Path,
    taken: set[str],
    display: Callable[[str], str],
    reporter: Reporter | None = None,
) -> tuple[list[NiftiCase], list[ReportRow]]:
    """Write every volume (and its label) into workdir/images and workdir/labels."""
    rep = reporter or NullReporter()
    labels = _label_index(labels_dir)
    cases: list[NiftiCase] = []
    rows: list[ReportRow] = []
    if volumes:
        rep.start("converting volumes", len(volumes))
    for path in volumes:
        name = case_name(path)
        row = ReportRow(display(str(path)), "volume", "ok")
        rows.append(row)
        rep.advance("converting volumes")
        case_id = _SAFE.sub("_", name).strip("._") or "case"
        if case_id in taken:
            row.status, row.reason = "failed:duplicate-name", f"another input already gave case '{case_id}'"
            continue
        try:
            img = _as_3d(read_image(path))
        except (MedclError, ValueError, RuntimeError) as exc:
            row.status, row.reason = "failed:unreadable", str(exc)
            continue
        label_img = None
        if name in labels:
            try:
                label_img = _as_3d(read_image(labels[name]))
            except (MedclError, ValueError, RuntimeError) as exc:
                row.status, row.reason = "failed:label", f"label {labels[name].name}: {exc}"
                continue
            if not same_grid(img, label_img, tol=1e-3):
                row.status = "failed:label-grid"
                row.reason = f"label {labels[name].name} is on another grid: {grid_difference(img, label_img)}"
                continue
            arr = sitk.GetArrayFromImage(label_img)
            if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))):
                row.status, row.reason = "failed:label-values", f"label {labels[name].name} has non-integer values"
                continue
            if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
                row.status, row.reason = "failed:label-values", f"label {labels[name].name} has values outside 0..65535"
                continue
            arr = arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.uint16)
            label_img = sitk.GetImageFromArray(arr)
            label_img.CopyInformation(img)
        taken.add(case_id)
        image_path = write_volume(_clean(img), workdir / "images" / f"{case_id}.nii.gz")
        label_path = None
        values: list[int] = []
        if label_img is not None:
            label_path = write_volume(label_img, workdir / "labels" / f"{case_id}.nii.gz")
            values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label_img))]
        row.case_id = case_id
        cases.append(NiftiCase(case_id, name, image_path, label_path, tuple(img.GetSize()),
                               tuple(img.GetSpacing()), values))
    if volumes:
        rep.finish("converting volumes")
    return cases, rows


def _clean(img: sitk.Image) -> sitk.Image:
    """A copy with geometry only: no metadata dictionary (descrip, aux_file, ...) is carried over."""
    out = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(img))
    out.CopyInformation(img)
    return out
