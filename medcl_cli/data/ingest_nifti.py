"""NIfTI/NRRD/MHA volumes to cases, with labels matched by case name (nnU-Net `_0000` suffix tolerated).

Volumes are re-written through SimpleITK (so headers carry nothing but geometry) and verified; a label on
another grid or with non-integer values is an error for that case, with the reason. 4D volumes (refused, or
split/picked with `--frames`) and NaN/inf voxels (replaced, with a note) are volume_frames.py's.
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
from medcl_cli.data.volume_frames import (
    SPLIT,
    Frames,
    FramesError,
    frame_ids,
    frame_suffix,
    label_frame,
    masks_of,
    n_frames,
    nonfinite_masks,
    pick_frames,
    replace_nonfinite,
    shape_text,
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


def _label_index(labels_dir: Path | None) -> dict[str, Path]:
    if labels_dir is None:
        return {}
    return {case_name(p): p for p in sorted(labels_dir.rglob("*")) if is_volume_file(p)}


def convert_volume(path: Path, label: Path | None, case_id: str, workdir: Path) -> tuple[str, str, NiftiCase | None]:
    """(status, reason, case) for one 3D volume and its label (a 4D one is refused: `failed:4d`)."""
    return convert_frames(path, label, case_id, workdir)[0]


def convert_frames(path: Path, label: Path | None, case_id: str, workdir: Path, frames: Frames = None
                   ) -> list[tuple[str, str, NiftiCase | None]]:
    """(status, reason, case) per case `path` makes: one, or one per frame of a 4D volume with `--frames split`
    (volume_frames.py); runs in a worker process. An ok row's reason notes the frame and replaced voxels."""
    name = case_name(path)
    try:
        img = read_image(path)
        picked = pick_frames(img, frames)
        masks = nonfinite_masks(path, img)
    except FramesError as exc:
        return [(exc.status, str(exc), None)]
    except (MedclError, ValueError, RuntimeError) as exc:
        return [("failed:unreadable", str(exc).replace(str(path), path.name), None)]  # the row names the file already
    label_img = None
    if label is not None:
        try:
            label_img = read_image(label)
            label_frame(label_img, label.name, picked[0][0], n_frames(img), frames)  # frames that do not pair: one row
        except FramesError as exc:
            return [(exc.status, str(exc), None)]
        except (MedclError, ValueError, RuntimeError) as exc:
            return [("failed:label", f"label {label.name}: {exc}", None)]
    results: list[tuple[str, str, NiftiCase | None]] = []
    count = n_frames(img)
    for index, vol in picked:
        cid = case_id + (frame_suffix(index, count) if frames == SPLIT and index is not None else "")
        notes = [f"frame {index} of {count} ({shape_text(img)})"] if index is not None else []
        try:
            vol, note = replace_nonfinite(vol, masks_of(masks, index, sitk.GetArrayViewFromImage(vol).shape))
            lab = None if label is None or label_img is None else label_frame(label_img, label.name, index, count, frames)
        except FramesError as exc:
            results.append((exc.status, str(exc), None))
            continue
        status, reason, case = _write_case(vol, lab, label, cid, name, workdir)
        results.append((status, "; ".join(notes + [note] if note else notes) if case else reason, case))
    return results


def _write_case(img: sitk.Image, label_img: sitk.Image | None, label: Path | None, case_id: str, name: str,
                workdir: Path) -> tuple[str, str, NiftiCase | None]:
    if label_img is not None and label is not None:
        if label_img.GetNumberOfComponentsPerPixel() > 1:
            return "failed:label", f"label {label.name}: {label_img.GetNumberOfComponentsPerPixel()} components per voxel", None
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
    frames: Frames = None,
) -> tuple[list[NiftiCase], list[ReportRow]]:
    """Write every volume (and its label) into workdir/images and workdir/labels, `workers` at a time; a 4D
    volume split by `frames` gives one report row per frame."""
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
        ids = frame_ids(path, case_id) if frames == SPLIT else [case_id]  # reserved before any file is written
        clash = [c for c in ids if c in taken]
        if clash:
            row.status, row.reason = "failed:duplicate-name", f"another input already gave case '{clash[0]}'"
            continue
        taken.update(ids)
        jobs.append((row, path, labels.get(name), case_id))
    if not jobs:
        return cases, rows
    rep.start("converting volumes", len(jobs))
    paths, labs, ids = [j[1] for j in jobs], [j[2] for j in jobs], [j[3] for j in jobs]
    dirs, choice = [workdir] * len(jobs), [frames] * len(jobs)
    if workers > 1 and len(jobs) > 2:
        from concurrent.futures import ProcessPoolExecutor

        from medcl_cli.data.dicom.scan import _context

        with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
            results = list(_advancing(pool.map(convert_frames, paths, labs, ids, dirs, choice, chunksize=4), rep))
    else:
        results = list(_advancing(map(convert_frames, paths, labs, ids, dirs, choice), rep))
    out_rows: dict[int, list[ReportRow]] = {}
    for (row, _, _, _), per_case in zip(jobs, results):
        out_rows[id(row)] = _frame_rows(row, per_case, cases, rep)
    rows = [r for row in rows for r in out_rows.get(id(row), [row])]
    rep.finish("converting volumes")
    return cases, rows


def _frame_rows(row: ReportRow, per_case: list[tuple[str, str, NiftiCase | None]], cases: list[NiftiCase],
                rep: Reporter) -> list[ReportRow]:
    """The report rows of one input: its own row, filled, and one more per further frame."""
    out: list[ReportRow] = []
    for k, (status, reason, case) in enumerate(per_case):
        r = row if k == 0 else ReportRow(row.source, row.kind, "ok")
        r.status, r.reason = status, reason
        out.append(r)
        if case is not None:
            r.case_id = case.case_id
            cases.append(case)
            if "replaced" in reason:
                rep.log(f"{r.source}: {reason}", "warning")
    return out


def _advancing(it: Iterable[list[tuple[str, str, NiftiCase | None]]], rep: Reporter
               ) -> Iterator[list[tuple[str, str, NiftiCase | None]]]:
    for item in it:
        rep.advance("converting volumes")
        yield item


def _clean(img: sitk.Image) -> sitk.Image:
    """A copy with geometry only: no metadata dictionary (descrip, aux_file, ...) is carried over."""
    out = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(img))
    out.CopyInformation(img)
    return out
