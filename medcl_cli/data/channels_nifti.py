"""`ingest --channels` for NIfTI/NRRD/MHA files: which file is which channel of which case.

Three file layouts are understood (docs/ingest.md), decided per file in this order:
1. nnU-Net: `<case>_<kkkk>.nii.gz` is channel k of `<case>` (`_0000` = the first --channels name).
2. A channel suffix: `<case>_<name>.nii.gz` where the part after the last `_` matches a --channels name
   (`BraTS_001_t1ce.nii.gz`, `PGBM-001_flair.nii.gz`).
3. One folder per case: `<case>/<name>.nii.gz`, the whole file stem matching a --channels name
   (`PGBM-001/T1post.nii.gz`, `PGBM-001/FLAIR_reg.nii.gz`).
Names match as everywhere (data/channels.py: exact > prefix > substring, case-insensitive). A case that
lacks a channel is refused (`failed:missing-channel`, the other cases still go in); files that match no
channel are `ignored:not-a-channel`. Channel 0 and the label are converted by `ingest_nifti.convert_volume`
(same checks as single-channel data); the other channels are resampled onto channel 0's grid if needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.channels import (
    assign_channels,
    best_matches,
    channel_file,
    resample_onto,
    stack_channels,
)
from medcl_cli.data.dicom.cases import ReportRow
from medcl_cli.data.dicom.volume import write_volume
from medcl_cli.data.ingest_nifti import NiftiCase, case_name, convert_volume
from medcl_cli.data.io import (
    grid_difference,
    is_volume_file,
    read_image,
    same_grid,
    strip_suffix,
)
from medcl_cli.data.volume_frames import nonfinite_masks, replace_nonfinite
from medcl_cli.errors import MedclError

_NNUNET = re.compile(r"^(.+)_(\d{4})$")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class _File:
    path: Path
    case: str
    token: str  # the text matched against the channel names ("" for the nnU-Net layout)
    index: int | None  # nnU-Net channel index


def classify(path: Path, channels: list[str]) -> _File:
    """Which case a file belongs to and what names its channel (see the module docstring)."""
    stem = strip_suffix(path.name)
    m = _NNUNET.match(stem)
    if m:
        return _File(path, m.group(1), "", int(m.group(2)))
    head, sep, tail = stem.rpartition("_")
    if sep and head and any(best_matches(ch, [tail]) for ch in channels):
        return _File(path, head, tail, None)
    return _File(path, path.parent.name or stem, stem, None)


def group_channel_files(volumes: list[Path], channels: list[str]) -> dict[str, list[_File]]:
    groups: dict[str, list[_File]] = {}
    for p in volumes:
        f = classify(p, channels)
        groups.setdefault(f.case, []).append(f)
    return groups


def pick_files(files: list[_File], channels: list[str]) -> tuple[list[_File] | None, str]:
    """The file of each channel, in channel order, or (None, why)."""
    by_index = {f.index: f for f in files if f.index is not None}
    if by_index:
        missing = [f"{k:04d} ({channels[k]})" for k in range(len(channels)) if k not in by_index]
        if missing:
            return None, f"no file for channel(s) {', '.join(missing)} (nnU-Net layout <case>_<kkkk>)"
        return [by_index[k] for k in range(len(channels))], ""
    picks, why = assign_channels(channels, [f.token for f in files])
    return (None, why) if picks is None else ([files[i] for i in picks], "")


def ingest_nifti_channels(
    volumes: list[Path],
    channels: list[str],
    labels_dir: Path | None,
    workdir: Path,
    taken: set[str],
    display: Callable[[str], str],
    reporter: Reporter | None = None,
) -> tuple[list[NiftiCase], list[ReportRow], dict[str, list[Path]], dict[str, list[str]]]:
    """(cases, report rows, channel files per case id, resampling notes per case id)."""
    rep = reporter or NullReporter()
    labels = {case_name(p): p for p in sorted(labels_dir.rglob("*")) if is_volume_file(p)} if labels_dir else {}
    cases: list[NiftiCase] = []
    rows: list[ReportRow] = []
    files_of: dict[str, list[Path]] = {}
    notes_of: dict[str, list[str]] = {}
    groups = group_channel_files(volumes, channels)
    if not groups:
        return cases, rows, files_of, notes_of
    rep.start("converting volumes", len(groups))
    for name, files in groups.items():
        rep.advance("converting volumes")
        picked, why = pick_files(files, channels)
        frows = {f.path: ReportRow(display(str(f.path)), "volume", "ok") for f in files}
        rows.extend(frows.values())
        if picked is None:
            rows.append(ReportRow(display(str(files[0].path.parent / name)), "case", "failed:missing-channel", why))
            for r in frows.values():
                r.status, r.reason = "ignored:incomplete-case", why
            continue
        for f in files:
            if f not in picked:
                frows[f.path].status = "ignored:not-a-channel"
                frows[f.path].reason = f"matches none of --channels {','.join(channels)} for case {name}"
        case_id = _SAFE.sub("_", name).strip("._-") or "case"
        if case_id in taken:
            frows[picked[0].path].status = "failed:duplicate-name"
            frows[picked[0].path].reason = f"another input already gave case '{case_id}'"
            continue
        status, reason, case, notes = _convert(picked, labels.get(name), case_id, name, workdir)
        first = frows[picked[0].path]
        if case is None:
            first.status, first.reason = status, reason
            for f in picked[1:]:
                frows[f.path].status, frows[f.path].reason = "ignored:incomplete-case", f"channel 0 of {name}: {status}"
            continue
        taken.add(case_id)
        for k, f in enumerate(picked):
            r = frows[f.path]
            r.case_id = case_id
            mine = [n for n in notes if n.startswith(f"channel {k} ")]
            r.reason = f"channel {k} ({channels[k]}) of {case_id}" + ("; " + "; ".join(mine) if mine else "")
        cases.append(case)
        files_of[case_id] = [workdir / channel_file(case_id, k) for k in range(len(channels))]
        notes_of[case_id] = notes
    rep.finish("converting volumes")
    return cases, rows, files_of, notes_of


def _convert(picked: list[_File], label: Path | None, case_id: str, name: str, workdir: Path
             ) -> tuple[str, str, NiftiCase | None, list[str]]:
    status, reason, case = convert_volume(picked[0].path, label, case_id, workdir)
    if case is None:
        return status, reason, None, []
    notes = [f"channel 0 {reason}"] if reason else []  # NaN/inf replaced
    first = workdir / "images" / f"{case_id}.nii.gz"
    try:
        images = [read_image(first)] + [read_image(f.path) for f in picked[1:]]
        bad = [f.path.name for f, img in zip(picked[1:], images[1:]) if img.GetDimension() != 3 or
               img.GetNumberOfComponentsPerPixel() != 1]
        if bad:
            raise ValueError(f"{bad[0]} is not a scalar 3D volume")
        for k in range(1, len(picked)):  # NaN/inf replaced as in channel 0 (volume_frames.py)
            images[k], fixed = replace_nonfinite(images[k], nonfinite_masks(picked[k].path, images[k]))
            notes += [f"channel {k} {fixed}"] if fixed else []
        stack_channels(images)  # refuses what cannot be put on one grid
    except (MedclError, ValueError, RuntimeError) as exc:  # FramesError (no finite voxel) included
        first.unlink(missing_ok=True)
        if case.label is not None:
            case.label.unlink(missing_ok=True)
        text = exc.message if isinstance(exc, MedclError) else str(exc)
        return "failed:unreadable", text, None, []
    dest0 = workdir / channel_file(case_id, 0)
    first.rename(dest0)
    for k in range(1, len(picked)):
        img = images[k]
        if not same_grid(img, images[0], tol=1e-3):
            notes.append(f"channel {k} resampled onto the grid of {picked[0].path.name} "
                         f"({grid_difference(images[0], img)})")
            img = resample_onto(img, images[0])
        clean = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(img))
        clean.CopyInformation(images[0])
        write_volume(clean, workdir / channel_file(case_id, k))
    case.image = dest0
    return "ok", "", case, notes
