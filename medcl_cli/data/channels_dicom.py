"""`ingest --channels` for DICOM: the image series of one study become the channels of one case.

`data.dicom.ingest_dicom` has already converted every image series into its own case (and attached the
mask series to every case of its study on the same grid). Here, per study, each channel name picks its
series by SeriesDescription (data/channels.py: exact > prefix > substring, case-insensitive); channel 0's
series gives the case its grid, meta rows and label, and the other channels are resampled onto that grid
when theirs differs (said in the series' ingest_report.csv row). A study that lacks a channel, or where a
channel is ambiguous, is refused with one `failed:missing-channel` row; its series are reported
`ignored:incomplete-study`. Image series that match no channel are `ignored:not-a-channel`.
Case ids are renumbered `case_0001`.. in study order, so the dataset has no gaps.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medcl_cli.data.channels import assign_channels, channel_file, resample_onto
from medcl_cli.data.dicom.cases import DicomCase, ReportRow
from medcl_cli.data.dicom.volume import write_volume
from medcl_cli.data.io import grid_difference, read_image, same_grid
from medcl_cli.data.meta import Redactor


@dataclass
class ChannelCase:
    """A multi-channel DICOM case: channel 0's DicomCase (case id, plan, grid, label) plus its channel files."""

    case: DicomCase
    files: list[Path]
    notes: list[str] = field(default_factory=list)
    series: list[tuple[str, str]] = field(default_factory=list)  # (SeriesNumber, SeriesDescription) per channel


def merge_dicom_channels(
    cases: list[DicomCase],
    rows: list[ReportRow],
    channels: list[str],
    workdir: Path,
    new_case_id: Callable[[], str],
    redact: Redactor,
) -> tuple[list[ChannelCase], list[ReportRow]]:
    """(multi-channel cases, extra report rows); rewrites workdir/images and workdir/labels in place."""
    row_of = {r.case_id: r for r in rows if r.case_id and r.kind == "dicom-series"}
    originals = [p for c in cases for p in (c.image, c.label) if p is not None]
    studies: dict[str, list[DicomCase]] = {}
    for c in cases:
        if c.plan.time_index not in (None, 0):
            row = row_of.get(c.case_id)
            if row is not None:
                row.status, row.reason = "ignored:not-a-channel", "time point > 0 of a 4D series"
            continue
        studies.setdefault(c.plan.study, []).append(c)
    stage = workdir / ".channels"
    stage.mkdir(exist_ok=True)
    extra: list[ReportRow] = []
    out: list[ChannelCase] = []
    renamed: dict[str, str] = {}
    for study_cases in studies.values():
        study_cases.sort(key=lambda c: c.plan.sort_key())
        descs = [c.plan.description for c in study_cases]
        picks, why = assign_channels(channels, descs)
        if picks is None:
            sources = sorted(row_of[c.case_id].source for c in study_cases if c.case_id in row_of)
            extra.append(ReportRow(str(Path(sources[0]).parent) if sources else "study", "dicom-study", "failed:missing-channel", redact(why), modality=study_cases[0].plan.modality,
                                   files=sum(len(c.plan.files) for c in study_cases)))
            for c in study_cases:
                row = row_of.get(c.case_id)
                if row is not None:
                    row.status, row.reason, row.case_id = "ignored:incomplete-study", redact(why), ""
            continue
        cid = new_case_id()
        first = study_cases[picks[0]]
        ref = read_image(first.image)
        files: list[Path] = []
        notes: list[str] = []
        for k, (ch, i) in enumerate(zip(channels, picks)):
            c = study_cases[i]
            img = ref if k == 0 else read_image(c.image)
            note = ""
            if k and not same_grid(img, ref, tol=1e-3):
                note = f"resampled onto the {redact(first.plan.description)} grid ({grid_difference(ref, img)})"
                img = resample_onto(img, ref)
                notes.append(f"channel {k} ({ch}) {note}")
            dest = stage / Path(channel_file(cid, k)).name
            write_volume(img, dest)
            files.append(workdir / channel_file(cid, k))
            row = row_of.get(c.case_id)
            if row is not None:
                row.reason = "; ".join(x for x in (f"channel {k} ({ch}) of {cid}", note, row.reason) if x)
                renamed[c.case_id] = cid
        label = _channel_label(study_cases, picks, ref, stage / f"{cid}.label.nii.gz")
        first.label_values = label[1] if label else []
        first.label_names = label[2] if label else {}
        first.label = workdir / "labels" / f"{cid}.nii.gz" if label else None
        for k, i in enumerate(picks):
            if k:
                study_cases[i].label = None
        for i, c in enumerate(study_cases):
            if i not in picks:
                row = row_of.get(c.case_id)
                if row is not None:
                    row.status, row.reason, row.case_id = "ignored:not-a-channel", (
                        f"its description matches none of --channels {','.join(channels)}"), ""
        first.case_id = cid
        first.image = files[0]
        out.append(ChannelCase(first, files, notes,
                               [(study_cases[i].plan.series_number, study_cases[i].plan.description) for i in picks]))
    for p in originals:  # the single-series files: replaced by the staged channel files
        p.unlink(missing_ok=True)
    for f in sorted(stage.iterdir()):
        if f.name.endswith(".label.nii.gz"):
            f.rename(workdir / "labels" / f.name.replace(".label.nii.gz", ".nii.gz"))
        else:
            f.rename(workdir / "images" / f.name)
    shutil.rmtree(stage, ignore_errors=True)
    for r in rows:
        if r.status == "label" and r.case_id:  # a mask series: label of the merged case(s) now
            r.case_id = ",".join(dict.fromkeys(renamed[x] for x in r.case_id.split(",") if x in renamed))
            r.reason = f"label of {r.case_id}" if r.case_id else "label of no case (its study was refused)"
            if not r.case_id:
                r.status = "ignored:incomplete-study"
        elif r.case_id in renamed:
            r.case_id = renamed[r.case_id]
    return out, extra


def _channel_label(study_cases: list[DicomCase], picks: list[int], ref: sitk.Image, dest: Path
                   ) -> tuple[Path, list[int], dict[int, str]] | None:
    """The label of the new case (file, values, class names): channel 0's mask, else another channel's
    resampled (nearest) onto its grid."""
    for i in picks:
        c = study_cases[i]
        if c.label is None:
            continue
        lab = read_image(c.label)
        if not same_grid(lab, ref, tol=1e-3):
            lab = resample_onto(lab, ref, nearest=True)
        write_volume(lab, dest)
        return dest, [int(v) for v in np.unique(sitk.GetArrayViewFromImage(lab))], dict(c.label_names)
    return None
