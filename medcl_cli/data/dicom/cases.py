"""DICOM to cases: scan headers, plan volumes, convert them in parallel, attach mask series and SEG labels.

The pieces live by concept in `scan` (files, zips, parallel header reading; `source` for a path or zip member), `frames` (one
record per 2D frame, functional groups), `series` (grouping, sorting, 4D, gaps, tilt), `volume`
(pixels, rescale, NIfTI writing) and `seg_reader` (DICOM-SEG labels). This module strings them together for
`data.ingest` and returns `DicomCase`s plus one report row per series or file.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medcl_cli.config import IngestConfig
from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.dicom.frames import Frame
from medcl_cli.data.dicom.scan import FileIssue, scan_headers, worker_count
from medcl_cli.data.dicom.seg_reader import SegMismatch, seg_to_label
from medcl_cli.data.dicom.series import SeriesPlan, plan_series
from medcl_cli.data.dicom.source import Source
from medcl_cli.data.dicom.volume import Converted, run_plans, write_volume
from medcl_cli.data.meta import Redactor

__all__ = ["DicomCase", "ReportRow", "ingest_dicom", "Source", "FileIssue", "Frame", "SeriesPlan"]


@dataclass
class ReportRow:
    """One line of ingest_report.csv (text already redacted)."""

    source: str
    kind: str
    status: str
    reason: str = ""
    case_id: str = ""
    modality: str = ""
    series_number: str = ""
    description: str = ""
    files: int = 1


@dataclass
class DicomCase:
    """One converted image volume with its plan, geometry and (optional) label file in the work folder."""

    case_id: str
    plan: SeriesPlan
    conv: Converted
    image: Path
    label: Path | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    label_values: list[int] = field(default_factory=list)
    status: str = "ok"
    reason: str = ""


def _same_grid(a: Converted, b: Converted, tol: float = 1e-3) -> bool:
    return a.size == b.size and all(
        np.allclose(x, y, atol=tol, rtol=0)
        for x, y in ((a.spacing, b.spacing), (a.origin, b.origin), (a.direction, b.direction))
    )


def _grid_diff(a: Converted, b: Converted) -> str:
    if a.size != b.size:
        return f"size {a.size} vs {b.size}"
    for name, x, y in (("spacing", a.spacing, b.spacing), ("origin", a.origin, b.origin),
                       ("direction", a.direction, b.direction)):
        if not np.allclose(x, y, atol=1e-3, rtol=0):
            return f"{name} {tuple(round(v, 3) for v in x)} vs {tuple(round(v, 3) for v in y)}"
    return ""


def ingest_dicom(
    sources: list[Source],
    cfg: IngestConfig,
    keywords: tuple[str, ...],
    label_regex: str | None,
    workdir: Path,
    new_case_id: Callable[[], str],
    display: Callable[[str], str],
    redact: Redactor,
    reporter: Reporter | None = None,
    skip_labels: bool = False,
) -> tuple[list[DicomCase], list[ReportRow], list[Frame]]:
    """(cases, report rows, all frames) for DICOM sources; images are written to workdir/images.

    `skip_labels` (what `medcl predict` reads with): the series `label_regex` matches are not converted
    (`ignored:label-series` rows) and DICOM-SEG objects are not read (`ignored:seg` rows): no labels."""
    rep = reporter or NullReporter()
    frames, issues = scan_headers(sources, keywords, cfg.workers, rep)
    seen_phi = {v for f in frames for v in f.phi.values()} | {v for iss in issues for v in iss.phi.values()}
    for v in sorted(seen_phi):  # each distinct value once: 20 000 files of one patient repeat the same few
        redact.add(v)
    rows: list[ReportRow] = []
    for iss in issues:
        rows.append(ReportRow(redact(display(iss.source.label())), "dicom-file", iss.status, redact(iss.reason)))
    others: dict[str, list[Frame]] = {}
    for f in frames:
        if f.kind == "other":
            others.setdefault(f.source.label(), []).append(f)
    for label, fs in others.items():
        rows.append(ReportRow(redact(display(label)), "dicom-file", "ignored:non-image",
                              f"{fs[0].modality or 'non-image'} object (not an image), skipped",
                              modality=fs[0].modality, series_number=fs[0].series_number,
                              description=redact(fs[0].description)))
    plans = plan_series(frames, cfg, label_regex)
    if skip_labels:
        for plan in plans:
            if plan.role == "mask" and plan.status == "ok":
                plan.status, plan.reason = "ignored:label-series", f"SeriesDescription matches '{label_regex}'"
    tasks: list[tuple[SeriesPlan, str]] = []
    ids: dict[int, str] = {}
    (workdir / ".masks").mkdir(parents=True, exist_ok=True)
    for i, plan in enumerate(plans):
        if plan.status != "ok":
            continue
        if plan.role == "mask":
            path = workdir / ".masks" / f"mask_{i:05d}.nii.gz"
        else:
            ids[i] = new_case_id()
            path = workdir / "images" / f"{ids[i]}.nii.gz"
        tasks.append((plan, str(path)))
    results = run_plans(tasks, min(worker_count(cfg.workers), len(tasks)), rep)
    conv_of: dict[int, Converted] = {}
    it = iter(results)
    for i, plan in enumerate(plans):
        if plan.status == "ok":
            conv_of[i] = next(it)
    cases: list[DicomCase] = []
    masks: list[tuple[int, SeriesPlan, Converted]] = []
    plan_rows: dict[int, ReportRow] = {}
    for i, plan in enumerate(plans):
        conv = conv_of.get(i)
        status, reason = plan.status, plan.reason
        if conv is not None and conv.status != "ok":
            status, reason = conv.status, conv.reason
        flags = conv.flags if conv is not None and conv.status == "ok" else plan.flags
        if plan.sub:
            flags = [f"split by {plan.sub}"] + flags
        if status == "ok" and flags:
            reason = "; ".join(flags)
        files = plan.files
        folder = str(Path(files[0]).parent) if len({str(Path(f).parent) for f in files}) == 1 else files[0]
        row = ReportRow(redact(display(folder)), "dicom-series", status, redact(reason), modality=plan.modality,
                        series_number=plan.series_number, description=redact(plan.description), files=len(files))
        rows.append(row)
        plan_rows[i] = row
        if status != "ok" or conv is None:
            continue
        if plan.role == "mask":
            masks.append((i, plan, conv))
            row.status = "failed:label-grid"
            continue
        case = DicomCase(ids[i], plan, conv, workdir / "images" / f"{ids[i]}.nii.gz")
        row.case_id = case.case_id
        cases.append(case)
    _attach_masks(cases, masks, plan_rows, workdir, redact)
    if skip_labels:
        for f in {f.source.label(): f for f in frames if f.kind == "seg"}.values():
            rows.append(ReportRow(redact(display(f.source.label())), "dicom-seg", "ignored:seg",
                                  "DICOM-SEG object (a label, not an image)", modality="SEG",
                                  series_number=f.series_number, description=redact(f.description)))
    else:
        _attach_segs(cases, frames, rows, workdir, display, redact)
    return cases, rows, frames


def mask_class_names(description: str, values: list[int], redact: Redactor) -> dict[int, str]:
    """Class names a mask series gives its values: its SeriesDescription (`Mask_Tumor`) for a one-class
    mask, `<description>_<value>` for several; none when the description is empty or flagged as PHI."""
    name = redact.keep(" ".join(description.split()))
    fg = sorted(v for v in values if v != 0)
    if not name:
        return {}
    return {v: name if len(fg) == 1 else f"{name}_{v}" for v in fg}


def _attach_masks(cases: list[DicomCase], masks: list[tuple[int, SeriesPlan, Converted]],
                  plan_rows: dict[int, ReportRow], workdir: Path, redact: Redactor) -> None:
    """A mask series labels every image series of its study on the same grid (and names its classes)."""
    for i, mplan, mconv in masks:
        path = workdir / ".masks" / f"mask_{i:05d}.nii.gz"
        row = plan_rows[i]
        same_study = [c for c in cases if c.plan.study == mplan.study]
        hits = [c for c in same_study if _same_grid(c.conv, mconv)]
        if not hits:
            near = "; ".join(f"{c.case_id}: {_grid_diff(c.conv, mconv)}" for c in same_study[:3])
            row.status = "failed:label-grid"
            row.reason = "no image series of its study on the same grid" + (f" ({near})" if near else "")
            continue
        done = []
        for c in hits:
            if c.label is not None:
                continue
            dest = workdir / "labels" / f"{c.case_id}.nii.gz"
            shutil.copyfile(path, dest)
            c.label, c.label_values = dest, list(mconv.values)
            c.label_names = mask_class_names(mplan.description, c.label_values, redact)
            done.append(c.case_id)
        row.status = "label"
        row.reason = "label of " + (", ".join(done) if done else "no case (already labelled)")
        row.case_id = ",".join(done)


def _attach_segs(cases: list[DicomCase], frames: list[Frame], rows: list[ReportRow], workdir: Path,
                 display: Callable[[str], str], redact: Redactor) -> None:
    """A DICOM-SEG object labels the image series it references."""
    for f in frames:
        if f.kind != "seg":
            continue
        row = ReportRow(redact(display(f.source.label())), "dicom-seg", "failed:seg", modality="SEG",
                        series_number=f.series_number, description=redact(f.description))
        rows.append(row)
        targets = [c for c in cases if c.plan.series in f.refs and c.plan.time_index in (None, 0)]
        if not targets:
            row.reason = "the image series it references is not among the inputs (or was not converted)"
            continue
        case = targets[0]
        try:
            label, names = seg_to_label(f, str(case.image))
        except SegMismatch as exc:
            row.status, row.reason = "failed:label-grid", f"{exc} ({case.case_id})"
            continue
        except Exception as exc:  # noqa: BLE001 - a broken SEG is reported, not fatal
            row.reason = f"cannot read the SEG: {type(exc).__name__}: {exc}"
            continue
        dest = workdir / "labels" / f"{case.case_id}.nii.gz"
        write_volume(label, dest)
        case.label = dest
        case.label_values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label))]
        case.label_names = names
        row.status, row.reason, row.case_id = "label", f"label of {case.case_id}", case.case_id
