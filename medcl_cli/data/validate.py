"""`medcl validate`: re-check a dataset folder and list every problem at once.

Checks: the manifest files parse; every image/label file (every channel of a multi-channel case) exists and
reads, channels share channel 0's grid; labels lie on their image's grid
and hold only values named in dataset.json; split values are train/val/test; meta.csv has exactly size_z rows
per case with slices 0..size_z-1; no NaN/inf voxels; sizes and spacings in cases.csv match the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.folder import SPLITS, open_dataset
from medcl_cli.data.io import grid_difference, read_image, same_grid
from medcl_cli.errors import MedclError


@dataclass
class Problem:
    case_id: str
    check: str
    message: str


@dataclass
class ValidationResult:
    root: Path
    cases: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read(path: Path) -> sitk.Image | str:
    if not path.is_file():
        return "file missing"
    try:
        return read_image(path)
    except MedclError as exc:
        return f"unreadable ({exc.message})"


def _nonfinite(path: Path) -> int:
    """NaN/inf voxels counted on the raw file: ITK's NIfTI reader silently turns NaN into 0."""
    import nibabel as nib

    try:
        # nibabel annotates load() as FileBasedImage, which lacks .dataobj (every image it returns has it)
        arr = np.asarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not a NIfTI nibabel reads: fall back to SimpleITK
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return int(arr.size - np.count_nonzero(np.isfinite(arr))) if arr.dtype.kind == "f" else 0


def _number(row: Any, col: str) -> float | str | None:
    """The numeric value of a cases.csv cell, None when absent or empty, or a problem message."""
    if col not in row or str(row[col]).strip() in ("", "nan"):
        return None
    try:
        return float(row[col])
    except (TypeError, ValueError):
        return f"{col} is '{row[col]}' in cases.csv, not a number"


def validate_dataset(path: str | Path, reporter: Reporter | None = None) -> ValidationResult:
    """Every problem of a dataset folder (raises only when the folder is not a dataset at all)."""
    rep = reporter or NullReporter()
    ds = open_dataset(path)
    res = ValidationResult(ds.root, len(ds.cases))
    add = res.problems.append
    allowed = set(ds.labels)
    bad_split = ds.cases[~ds.cases["split"].isin(SPLITS)]
    for _, row in bad_split.iterrows():
        add(Problem(str(row["case_id"]), "split", f"split '{row['split']}' is not one of {', '.join(SPLITS)}"))
    dup = ds.cases["case_id"][ds.cases["case_id"].duplicated()]
    for cid in dup:
        add(Problem(str(cid), "cases", "case_id appears more than once in cases.csv"))
    meta_missing = [c for c in ("case_id", "slice", "slice_position") if c not in ds.meta.columns]
    if meta_missing:
        add(Problem("", "meta", f"meta.csv lacks column(s) {', '.join(meta_missing)}"))
    groups = ds.meta.groupby("case_id") if not meta_missing else None
    known = set(ds.cases["case_id"])
    if groups is not None:
        for cid in sorted(set(ds.meta["case_id"]) - known):
            add(Problem(str(cid), "meta", "meta.csv has rows for a case not in cases.csv"))
    rep.start("validating cases", len(ds.cases))
    for _, row in ds.cases.iterrows():
        cid = str(row["case_id"])
        rep.advance("validating cases")
        img = _read(ds.root / str(row["image"]))
        if isinstance(img, str):
            add(Problem(cid, "image", f"{row['image']}: {img}"))
            continue
        size = img.GetSize()
        if img.GetDimension() != 3:
            add(Problem(cid, "image", f"{row['image']} is {img.GetDimension()}D, expected 3D"))
            continue
        if sitk.GetArrayViewFromImage(img).dtype.kind == "f":
            bad = _nonfinite(ds.root / str(row["image"]))
            if bad:
                add(Problem(cid, "voxels", f"{bad} NaN/inf voxel(s) in {row['image']}"))
        for axis, name in enumerate(("x", "y", "z")):
            col = f"size_{name}"
            num = _number(row, col)
            if isinstance(num, str):
                add(Problem(cid, "cases", num))
            elif num is not None and int(num) != size[axis]:
                add(Problem(cid, "cases", f"{col} is {row[col]} in cases.csv but {size[axis]} in the image"))
            col = f"spacing_{name}"
            num = _number(row, col)
            if isinstance(num, str):
                add(Problem(cid, "cases", num))
            elif num is not None and abs(num - img.GetSpacing()[axis]) > 1e-4:
                add(Problem(cid, "cases", f"{col} is {row[col]} in cases.csv but {img.GetSpacing()[axis]:.6g} in the image"))
        if groups is not None:
            rows = groups.get_group(cid) if cid in groups.groups else None
            n = 0 if rows is None else len(rows)
            if n != size[2]:
                add(Problem(cid, "meta", f"meta.csv has {n} row(s) for this case, the image has {size[2]} slices"))
            elif rows is not None and sorted(rows["slice"].astype(int)) != list(range(size[2])):
                add(Problem(cid, "meta", "meta.csv slices are not 0..size_z-1"))
        for k in range(1, ds.num_channels):
            _check_channel(ds.root, row, k, img, add)
        label = str(row["label"])
        if label:
            lab = _read(ds.root / label)
            if isinstance(lab, str):
                add(Problem(cid, "label", f"{label}: {lab}"))
                continue
            if not same_grid(img, lab, tol=1e-3):
                add(Problem(cid, "label", f"label grid differs from the image: {grid_difference(img, lab)}"))
                continue
            values = set(int(v) for v in np.unique(sitk.GetArrayViewFromImage(lab)))
            extra = sorted(values - allowed)
            if extra:
                add(Problem(cid, "label", f"label values {extra} are not in dataset.json labels {sorted(allowed)}"))
    rep.finish("validating cases")
    return res


def _check_channel(root: Path, row: Any, k: int, first: sitk.Image, add: Any) -> None:
    """Channel k of a multi-channel case reads, is 3D and lies on channel 0's grid (ingest resamples it there)."""
    from medcl_cli.data.channels import channel_column

    cid, rel = str(row["case_id"]), str(row[channel_column(k)])
    img = _read(root / rel)
    if isinstance(img, str):
        add(Problem(cid, "image", f"{rel}: {img}"))
    elif not same_grid(img, first, tol=1e-3):
        add(Problem(cid, "image", f"{rel} (channel {k}) is not on channel 0's grid: {grid_difference(first, img)}"))
    elif sitk.GetArrayViewFromImage(img).dtype.kind == "f" and _nonfinite(root / rel):
        add(Problem(cid, "voxels", f"NaN/inf voxel(s) in {rel}"))


def problems_error(res: ValidationResult) -> MedclError:
    from medcl_cli.errors import InvalidDataError

    return InvalidDataError(f"{len(res.problems)} problem(s) in {res.root}",
                            "fix the listed files, or re-run medcl ingest with --overwrite")
