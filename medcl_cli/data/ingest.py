"""`medcl ingest`: DICOM folders, zips and NIfTI/NRRD/MHA files -> one dataset folder (data/folder.py).

Everything is written into a temporary sibling folder that is renamed into place at the end, under a lock
beside `--out` (core/lock.py; the checks and the swap are in ingest_output.py), so a failed or killed ingest
leaves no half dataset and a second writer is refused. PHI stays out of every file outside `private/`: case
ids are `case_NNNN` (DICOM) or the NIfTI file name, patients are salted hashes of PatientID, report rows, log
lines and allowed free text go through the one Scrubber (phi.py), and identifiers asked for with
`--allow-phi` go to `private/meta_phi.csv` only.

One piece past 300 lines: the order of the ingest steps (walk, convert, split, write, report, swap) is
what keeps a failed ingest from leaving anything behind; the steps themselves live in their modules.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcl_cli import __version__
from medcl_cli.config import IngestConfig
from medcl_cli.core.files import write_json_atomic, write_rows_atomic
from medcl_cli.core.lock import output_lock
from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.channels import channel_column, image_columns
from medcl_cli.data.dicom.cases import DicomCase, Frame, ReportRow, ingest_dicom
from medcl_cli.data.dicom.scan import walk_inputs
from medcl_cli.data.folder import CASES_COLUMNS, FORMAT_VERSION
from medcl_cli.data.ingest_failure import nothing_usable
from medcl_cli.data.ingest_nifti import ingest_nifti
from medcl_cli.data.ingest_output import (
    check_output,
    make_work,
    remove_stale_work,
    report_path_on_failure,
    skip_own_outputs,
    swap_into_place,
)
from medcl_cli.data.ingest_tables import (
    MetaTable,
    dicom_meta_rows,
    label_map,
    patient_split,
    read_meta_csv,
    read_split_file,
    volume_meta_rows,
)
from medcl_cli.data.meta import (
    normalised_columns,
    resolve_keywords,
    salted_hash,
    scrubbed_keywords,
    split_phi,
)
from medcl_cli.data.phi import ScrubbedReporter, Scrubber
from medcl_cli.errors import InputNotFoundError, UsageError


@dataclass
class IngestRequest:
    inputs: list[Path]
    out: Path
    labels_dir: Path | None = None
    label_series: str | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    meta: list[str] = field(default_factory=list)
    meta_csv: Path | None = None
    split_file: Path | None = None
    allow_phi: bool = False
    allow_phi_tags: list[str] = field(default_factory=list)  # free-text --meta tags released to meta.csv, scrubbed
    overwrite: bool = False
    channels: list[str] = field(default_factory=list)  # --channels: one case per study, one channel per name
    frames: str | int | None = None  # --frames: a 4D volume split per frame ("split") or frame N kept (volume_frames.py)
    cfg: IngestConfig = field(default_factory=IngestConfig)


@dataclass
class IngestResult:
    out: Path
    cases: int
    labelled: int
    splits: dict[str, int]
    failed: int  # inputs that should have become cases (or labels) and did not
    ignored: int  # expected skips: non-DICOM files, localizers, SR/PR/KO
    reasons: dict[str, int]
    missing_meta: dict[str, int]
    split_patients: dict[str, int] = field(default_factory=dict)  # distinct patients per split

    @property
    def partial(self) -> bool:
        return self.failed > 0


def _display_fn(inputs: list[Path]) -> Any:
    roots = [p.resolve() for p in inputs]

    def display(path: str) -> str:
        base, _, member = path.partition("!")
        p = Path(base).parent.resolve() / Path(base).name  # not the link's target: a broken link stays in place
        for r in roots:
            anchor = r if r.is_dir() else r.parent
            if p == r or anchor in p.parents:
                rel = os.path.join(anchor.name, str(p.relative_to(anchor)))
                return rel + (f"!{member}" if member else "")
        return path

    return display


def ingest(req: IngestRequest, reporter: Reporter | None = None) -> IngestResult:
    """Run the whole ingest (see module docstring); raises MedclError subclasses for user problems."""
    rep = reporter or NullReporter()
    missing = [p for p in req.inputs if not p.exists()]
    if missing:
        raise InputNotFoundError(f"input not found: {', '.join(str(p) for p in missing)}", "check the path(s)")
    keywords = resolve_keywords(req.meta, req.allow_phi, req.allow_phi_tags)
    if req.label_series:
        import re

        try:
            re.compile(req.label_series)
        except re.error as exc:
            raise UsageError(f"--label-series '{req.label_series}' is not a valid regular expression: {exc}",
                             "e.g. --label-series Mask or --label-series '(?i)seg|mask'") from None
    if req.frames is not None and req.channels:
        raise UsageError("--frames is not combined with --channels", "split the 4D files into 3D files per channel "
                         "first, or ingest them without --channels")
    public, phi = split_phi(keywords)
    meta_table = read_meta_csv(req.meta_csv) if req.meta_csv else None
    split_map = read_split_file(req.split_file) if req.split_file else None
    if req.labels_dir is not None and not req.labels_dir.is_dir():
        raise InputNotFoundError(f"--labels folder not found: {req.labels_dir}", "check the path")
    out = req.out.resolve()
    check_output(out, req.overwrite)
    with output_lock(out):  # a second ingest into the same --out is refused (exit 6), never silently replaced
        state = check_output(out, req.overwrite)
        remove_stale_work(out)
        work = make_work(out)
        try:
            result = _ingest_into(req, work, out, keywords, public, phi, meta_table, split_map, rep)
            swap_into_place(work, out, state)
            return result
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)


def _ingest_into(req: IngestRequest, work: Path, out: Path, keywords: list[str], public: list[str],
                 phi: list[str], meta_table: MetaTable | None, split_map: dict[str, str] | None,
                 rep: Reporter) -> IngestResult:
    display = _display_fn(req.inputs)
    redact = Scrubber()  # the one scrubber: report rows, log lines, allowed free-text meta values, errors
    rep = ScrubbedReporter(rep, redact)
    walked = walk_inputs(req.inputs)
    skipped_rows = skip_own_outputs(walked, req.inputs, out, display, rep)
    if req.labels_dir is not None:  # `ingest data/ --labels data/labels`: labels are not images
        lab_root = req.labels_dir.resolve()
        walked.volumes = [v for v in walked.volumes if lab_root not in v.resolve().parents]
    taken: set[str] = set()
    from medcl_cli.data.dicom.scan import worker_count

    n_channels = max(len(req.channels), 1)
    channel_files: dict[str, list[Path]] = {}
    channel_notes: dict[str, list[str]] = {}
    channel_series: dict[str, list[tuple[str, str]]] = {}
    if req.channels:
        from medcl_cli.data.channels_nifti import ingest_nifti_channels

        nifti_cases, rows, channel_files, channel_notes = ingest_nifti_channels(
            walked.volumes, req.channels, req.labels_dir, work, taken, display, rep)
    else:
        nifti_cases, rows = ingest_nifti(walked.volumes, req.labels_dir, work, taken, display, rep,
                                         worker_count(req.cfg.workers), req.frames)
    counter = [0]

    def new_case_id() -> str:
        while True:
            counter[0] += 1
            cid = f"case_{counter[0]:04d}"
            if cid not in taken:
                taken.add(cid)
                return cid

    dicom_cases: list[DicomCase] = []
    drows: list[ReportRow] = []
    frames: list[Frame] = []
    if walked.dicom:
        dicom_cases, drows, frames = ingest_dicom(walked.dicom, req.cfg, tuple(keywords), req.label_series, work,
                                                  new_case_id, display, redact, rep)
        if req.channels:
            from medcl_cli.data.channels_dicom import merge_dicom_channels

            for c in dicom_cases:  # their ids are given back: the merged cases are numbered afresh
                taken.discard(c.case_id)
            counter[0] = 0
            merged, study_rows = merge_dicom_channels(dicom_cases, drows, req.channels, work, new_case_id, redact)
            dicom_cases = [m.case for m in merged]
            channel_files.update({m.case.case_id: m.files for m in merged})
            channel_notes.update({m.case.case_id: m.notes for m in merged})
            channel_series.update({m.case.case_id: m.series for m in merged})
            drows += study_rows
    rows = [ReportRow(display(i.source.label()), "file", i.status, i.reason) for i in walked.issues] + rows + drows
    rows += skipped_rows
    for r in rows:  # every row, walk issues included, through the same scrubber
        r.source, r.reason, r.description = redact(r.source), redact(r.reason), redact(r.description)
    report_cols = ["source", "kind", "status", "reason", "case_id", "modality", "series_number", "description", "files"]
    salt = hashlib.sha256("\n".join(sorted({f.study for f in frames})).encode()).hexdigest()
    case_rows: list[dict[str, Any]] = []
    meta_rows: list[dict[str, Any]] = []
    private_rows: list[dict[str, Any]] = []
    id_map: list[dict[str, Any]] = []
    values: set[int] = set()
    names: dict[int, str] = {}
    for c in dicom_cases:
        if c.label is not None:
            values.update(c.label_values)
            names.update({k: v for k, v in c.label_names.items() if k not in names})
        patient = "p_" + salted_hash(c.plan.patient, salt)
        case_rows.append({
            "case_id": c.case_id, **image_columns(c.case_id, n_channels),
            "label": f"labels/{c.case_id}.nii.gz" if c.label else "", "patient": patient,
            "spacing_x": c.conv.spacing[0], "spacing_y": c.conv.spacing[1], "spacing_z": c.conv.spacing[2],
            "size_x": c.conv.size[0], "size_y": c.conv.size[1], "size_z": c.conv.size[2],
            "source": "dicom", "modality": c.plan.modality,
            **_series_columns(channel_series.get(c.case_id) or [(c.plan.series_number, c.plan.description)], redact),
            "time_index": c.plan.time_index,
            "flags": "; ".join([*c.conv.flags, *channel_notes.get(c.case_id, [])]), "nonfinite_voxels": c.conv.nonfinite,
        })
        mrows, prows = dicom_meta_rows(c, public, phi, redact, scrubbed_keywords(public))
        meta_rows.extend(mrows)
        private_rows.extend(prows)
        f0 = c.plan.frames[0]
        id_map.append({"case_id": c.case_id, "PatientID": f0.phi.get("PatientID", ""),
                       "PatientName": f0.phi.get("PatientName", ""), "StudyInstanceUID": c.plan.study,
                       "SeriesInstanceUID": c.plan.series, "files": len(c.plan.files)})
    for n in nifti_cases:
        values.update(n.label_values)
        extra = meta_table[1].get(n.name, {}) if meta_table is not None else {}
        patient = str(extra.get("patient") or n.name)
        case_rows.append({
            "case_id": n.case_id, **image_columns(n.case_id, n_channels),
            "label": f"labels/{n.case_id}.nii.gz" if n.label else "", "patient": patient,
            "spacing_x": n.spacing[0], "spacing_y": n.spacing[1], "spacing_z": n.spacing[2],
            "size_x": n.size[0], "size_y": n.size[1], "size_z": n.size[2], "source": "nifti", "modality": "",
            "_name": n.name,
        })
        meta_rows.extend(volume_meta_rows(n.case_id, n.size[2], public))
    n_cases = len(case_rows)
    if n_cases == 0:  # the report is written all the same, where it cannot mix with an earlier dataset
        report = report_path_on_failure(out)
        write_rows_atomic([r.__dict__ for r in rows], report_cols, report)
        reasons = Counter(r.status for r in rows)
        why = ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())) or "no files"
        refused = [r.reason for r in rows if r.status == "failed:missing-channel"]
        if req.channels and refused:
            raise InputNotFoundError(
                redact(f"--channels {','.join(req.channels)}: no study or case has every channel ({why}); e.g. {refused[0]}"),
                "name the channels after the SeriesDescriptions (or file names) listed in the reason",
            )
        raise nothing_usable(rows, req.inputs, report, redact)
    names.update(req.label_names)
    join_cols = _join_and_split(case_rows, meta_rows, meta_table, split_map, req, rep)
    case_rows.sort(key=lambda r: r["case_id"])
    meta_rows.sort(key=lambda r: (r["case_id"], r["slice"]))
    extra_case_cols = ["time_index", "flags", "nonfinite_voxels"] if dicom_cases else []
    channel_cols = [channel_column(k) for k in range(1, n_channels)]
    case_cols = CASES_COLUMNS[:2] + channel_cols + CASES_COLUMNS[2:] + extra_case_cols + [c for c in join_cols if c not in CASES_COLUMNS]
    meta_cols = ["case_id", "slice", "slice_position", "patient"]
    for key in public:
        meta_cols.append(key)
        meta_cols.extend(normalised_columns(key, ""))
    meta_cols += [c for c in join_cols if c not in meta_cols]
    labelled = sum(1 for r in case_rows if r["label"])
    counts = {"cases": n_cases, "labelled": labelled, "slices": len(meta_rows),
              **{s: sum(1 for r in case_rows if r["split"] == s) for s in ("train", "val", "test")}}
    missing_meta = {k: sum(1 for m in meta_rows if m.get(k, "") == "") for k in public}
    split_patients = {s: len({r["patient"] for r in case_rows if r["split"] == s}) for s in ("train", "val", "test")}
    info = {
        "format_version": FORMAT_VERSION, "name": out.name, "labels": label_map(values, names),
        "modality": "/".join(sorted({r["modality"] for r in case_rows if r["modality"]})) or "unknown",
        "medcl_version": __version__, "file_ending": ".nii.gz", "counts": counts, "split_patients": split_patients,
        "meta_columns": meta_cols[3:], "missing_meta": missing_meta,
    }
    if req.label_series:  # what predict skips in a DICOM folder by default (the masks, not images to segment)
        info["label_series"] = req.label_series
    if req.channels:
        info["channel_names"] = {str(k): name for k, name in enumerate(req.channels)}
    write_rows_atomic(case_rows, case_cols, work / "cases.csv")
    write_rows_atomic(meta_rows, meta_cols, work / "meta.csv")
    write_rows_atomic([r.__dict__ for r in rows], report_cols, work / "ingest_report.csv")
    write_json_atomic(info, work / "dataset.json")
    if req.allow_phi and (phi or id_map):
        # PHI: owner-only whatever the umask (everything else follows the umask, so a team can share it)
        (work / "private").mkdir(mode=0o700)
        os.chmod(work / "private", 0o700)
        write_rows_atomic(id_map, ["case_id", "PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID",
                                   "files"], work / "private" / "id_map.csv")
        if phi:
            write_rows_atomic(private_rows, ["case_id", "slice", *phi], work / "private" / "meta_phi.csv")
        for f in (work / "private").iterdir():
            os.chmod(f, 0o600)
    statuses = Counter(r.status for r in rows)
    failed = sum(v for k, v in statuses.items() if k.startswith("failed"))
    ignored = sum(v for k, v in statuses.items() if k.startswith("ignored"))
    return IngestResult(out, n_cases, labelled, {s: counts[s] for s in ("train", "val", "test")},
                        failed, ignored, dict(statuses), missing_meta, split_patients)


def _series_columns(series: list[tuple[str, str]], redact: Scrubber) -> dict[str, str]:
    """cases.csv's series_number and series_description (a multi-channel case's joined with `+`); a
    description the PHI guard flags (a patient name, a date) is left empty rather than half-redacted."""
    flagged = any(redact.flags(d) for _, d in series)
    return {"series_number": "+".join(n for n, _ in series),
            "series_description": "" if flagged else "+".join(d for _, d in series)}


def _join_and_split(cases: list[dict[str, Any]], meta: list[dict[str, Any]], table: MetaTable | None,
                    split_map: dict[str, str] | None, req: IngestRequest, rep: Reporter) -> list[str]:
    """Join --meta-csv columns (per case, repeated per slice) and assign the split, in place; returns the
    joined column names."""
    columns, rows = table if table is not None else ([], {})
    unmatched = 0
    for c in cases:
        key = c.pop("_name", None) or c["case_id"]
        extra = rows.get(key)
        if table is not None and extra is None:
            unmatched += 1
        for col in columns:
            if col != "patient":
                c[col] = (extra or {}).get(col, "")
        c["_key"] = key
    if unmatched:
        rep.log(f"--meta-csv: {unmatched} case(s) have no row in {req.meta_csv}", "warning")
    if split_map is not None:
        absent = 0
        for c in cases:
            c["split"] = split_map.get(c["_key"], "")
            if not c["split"]:
                absent += 1
                c["split"] = "train"
        if absent:
            rep.log(f"--split-file: {absent} case(s) not listed; they go to train", "warning")
    else:
        by_patient = patient_split([c["patient"] for c in cases], req.cfg.val_fraction, req.cfg.test_fraction,
                                   req.cfg.seed)
        for c in cases:
            c["split"] = by_patient[c["patient"]]
    for c in cases:
        c.pop("_key")
    per_case = {c["case_id"]: c for c in cases}
    joined = [col for col in columns if col != "patient"]
    for m in meta:
        c = per_case[m["case_id"]]
        m["patient"] = c["patient"]
        for col in joined:
            m[col] = c.get(col, "")
    return joined
