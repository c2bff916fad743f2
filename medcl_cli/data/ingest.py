"""`medcl ingest`: DICOM folders, zips and NIfTI/NRRD/MHA files -> one dataset folder (data/folder.py).

Everything is written into a temporary sibling folder that is renamed into place at the end, so a failed or
killed ingest leaves no half dataset. PHI stays out of every file outside `private/`: case ids are
`case_NNNN` (DICOM) or the NIfTI file name, patients are salted hashes of PatientID, report text is
redacted, and PHI tags asked for with `--allow-phi` go to `private/meta_phi.csv` only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medcl_cli import __version__
from medcl_cli.config import IngestConfig
from medcl_cli.data.dicom import ReportRow, ingest_dicom
from medcl_cli.data.dicom_scan import walk_inputs
from medcl_cli.data.folder import CASES_COLUMNS, FORMAT_VERSION, write_csv_atomic, write_json_atomic
from medcl_cli.data.ingest_nifti import ingest_nifti
from medcl_cli.data.ingest_tables import (
    dicom_meta_rows, label_map, patient_split, read_meta_csv, read_split_file, volume_meta_rows,
)
from medcl_cli.data.meta import Redactor, resolve_keywords, salted_hash, split_phi
from medcl_cli.errors import InputNotFoundError, OutputError
from medcl_cli.report import NullReporter, Reporter


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
    overwrite: bool = False
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

    @property
    def partial(self) -> bool:
        return self.failed > 0


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is a file", "choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} exists and is not empty", "add --overwrite to replace it, or choose a new folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out.parent}: {exc.strerror}", "check permissions or choose another folder") from None


def _display_fn(inputs: list[Path]) -> Any:
    roots = [p.resolve() for p in inputs]

    def display(path: str) -> str:
        base, _, member = path.partition("!")
        p = Path(base).resolve()
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
    keywords = resolve_keywords(req.meta, req.allow_phi)
    public, phi = split_phi(keywords)
    meta_df = read_meta_csv(req.meta_csv) if req.meta_csv else None
    split_map = read_split_file(req.split_file) if req.split_file else None
    if req.labels_dir is not None and not req.labels_dir.is_dir():
        raise InputNotFoundError(f"--labels folder not found: {req.labels_dir}", "check the path")
    out = req.out.resolve()
    _check_output(out, req.overwrite)
    work = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    (work / "images").mkdir(parents=True)
    (work / "labels").mkdir()
    try:
        result = _ingest_into(req, work, out, keywords, public, phi, meta_df, split_map, rep)
        _swap_into_place(work, out)
        return result
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _swap_into_place(work: Path, out: Path) -> None:
    shutil.rmtree(work / ".masks", ignore_errors=True)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ingest_into(req: IngestRequest, work: Path, out: Path, keywords: list[str], public: list[str], phi: list[str],
                 meta_df: pd.DataFrame | None, split_map: dict[str, str] | None, rep: Reporter) -> IngestResult:
    display = _display_fn(req.inputs)
    walked = walk_inputs(req.inputs)
    redact = Redactor()
    taken: set[str] = set()
    from medcl_cli.data.dicom_scan import worker_count

    nifti_cases, rows = ingest_nifti(walked.volumes, req.labels_dir, work, taken, display, rep,
                                     worker_count(req.cfg.workers))
    counter = [0]

    def new_case_id() -> str:
        while True:
            counter[0] += 1
            cid = f"case_{counter[0]:04d}"
            if cid not in taken:
                taken.add(cid)
                return cid

    dicom_cases, drows, frames = ([], [], [])
    if walked.dicom:
        dicom_cases, drows, frames = ingest_dicom(walked.dicom, req.cfg, tuple(keywords), req.label_series, work,
                                                  new_case_id, display, redact, rep)
    rows = [ReportRow(display(i.source.label()), "file", i.status, i.reason) for i in walked.issues] + rows + drows
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
            "case_id": c.case_id, "image": f"images/{c.case_id}.nii.gz",
            "label": f"labels/{c.case_id}.nii.gz" if c.label else "", "patient": patient,
            "spacing_x": c.conv.spacing[0], "spacing_y": c.conv.spacing[1], "spacing_z": c.conv.spacing[2],
            "size_x": c.conv.size[0], "size_y": c.conv.size[1], "size_z": c.conv.size[2],
            "source": "dicom", "modality": c.plan.modality, "time_index": c.plan.time_index,
            "flags": "; ".join(c.conv.flags), "nonfinite_voxels": c.conv.nonfinite,
        })
        mrows, prows = dicom_meta_rows(c, public, phi)
        meta_rows.extend(mrows)
        private_rows.extend(prows)
        f0 = c.plan.frames[0]
        id_map.append({"case_id": c.case_id, "PatientID": f0.phi.get("PatientID", ""),
                       "PatientName": f0.phi.get("PatientName", ""), "StudyInstanceUID": c.plan.study,
                       "SeriesInstanceUID": c.plan.series, "files": len(c.plan.files)})
    for n in nifti_cases:
        values.update(n.label_values)
        extra = meta_df.loc[n.name].to_dict() if meta_df is not None and n.name in meta_df.index else {}
        patient = str(extra.get("patient") or n.name)
        case_rows.append({
            "case_id": n.case_id, "image": f"images/{n.case_id}.nii.gz",
            "label": f"labels/{n.case_id}.nii.gz" if n.label else "", "patient": patient,
            "spacing_x": n.spacing[0], "spacing_y": n.spacing[1], "spacing_z": n.spacing[2],
            "size_x": n.size[0], "size_y": n.size[1], "size_z": n.size[2], "source": "nifti", "modality": "",
            "_name": n.name,
        })
        meta_rows.extend(volume_meta_rows(n.case_id, n.size[2], public))
    cases = pd.DataFrame(case_rows)
    meta = pd.DataFrame(meta_rows)
    n_cases = len(cases)
    if n_cases == 0:
        reasons = Counter(r.status for r in rows)
        why = ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())) or "no files"
        raise InputNotFoundError(f"no usable image found in {', '.join(str(p) for p in req.inputs)} ({why})",
                                 "point ingest at DICOM folders, zips or NIfTI/NRRD/MHA files")
    names.update(req.label_names)
    cases, meta = _join_and_split(cases, meta, meta_df, split_map, req, rep)
    rep_df = pd.DataFrame([r.__dict__ for r in rows],
                          columns=["source", "kind", "status", "reason", "case_id", "modality", "series_number",
                                   "description", "files"])
    info = {
        "format_version": FORMAT_VERSION, "name": out.name, "labels": label_map(values, names),
        "modality": "/".join(sorted({m for m in cases["modality"] if m})) or "unknown",
        "medcl_version": __version__, "file_ending": ".nii.gz",
        "counts": {"cases": n_cases, "labelled": int((cases["label"] != "").sum()), "slices": len(meta),
                   **{s: int((cases["split"] == s).sum()) for s in ("train", "val", "test")}},
        "meta_columns": [c for c in meta.columns if c not in ("case_id", "slice", "slice_position")],
    }
    missing_meta = {k: int((meta[k].astype(str) == "").sum()) for k in public if k in meta.columns}
    info["missing_meta"] = missing_meta
    write_csv_atomic(cases, work / "cases.csv")
    write_csv_atomic(meta, work / "meta.csv")
    write_csv_atomic(rep_df, work / "ingest_report.csv")
    write_json_atomic(info, work / "dataset.json")
    if req.allow_phi and (phi or id_map):
        (work / "private").mkdir()
        write_csv_atomic(pd.DataFrame(id_map), work / "private" / "id_map.csv")
        if phi:
            write_csv_atomic(pd.DataFrame(private_rows), work / "private" / "meta_phi.csv")
    statuses = Counter(r.status for r in rows)
    failed = sum(v for k, v in statuses.items() if k.startswith("failed"))
    ignored = sum(v for k, v in statuses.items() if k.startswith("ignored"))
    return IngestResult(out, n_cases, info["counts"]["labelled"], {s: info["counts"][s] for s in ("train", "val", "test")},
                        failed, ignored, dict(statuses), missing_meta)


def _join_and_split(cases: pd.DataFrame, meta: pd.DataFrame, meta_df: pd.DataFrame | None,
                    split_map: dict[str, str] | None, req: IngestRequest,
                    rep: Reporter) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join --meta-csv columns (per case, repeated per slice) and assign the split."""
    names = cases["_name"] if "_name" in cases.columns else pd.Series([None] * len(cases))
    key = names.where(names.notna(), cases["case_id"])
    if meta_df is not None:
        joined = meta_df.reindex(key.tolist())
        joined.index = cases.index
        for col in joined.columns:
            if col == "patient":
                continue
            cases[col] = joined[col].fillna("").values
        unmatched = int(joined.isna().all(axis=1).sum()) if len(joined.columns) else 0
        if unmatched:
            rep.log(f"--meta-csv: {unmatched} case(s) have no row in {req.meta_csv}", "warning")
    if split_map is not None:
        cases["split"] = [split_map.get(k, "") for k in key]
        absent = int((cases["split"] == "").sum())
        if absent:
            rep.log(f"--split-file: {absent} case(s) not listed; they go to train", "warning")
            cases.loc[cases["split"] == "", "split"] = "train"
    else:
        by_patient = patient_split(cases["patient"].tolist(), req.cfg.val_fraction, req.cfg.test_fraction,
                                   req.cfg.seed)
        cases["split"] = cases["patient"].map(by_patient)
    per_case = cases.set_index("case_id")
    join_cols = ["patient"] + [c for c in (meta_df.columns if meta_df is not None else []) if c != "patient"]
    for col in join_cols:
        if col in per_case.columns:
            meta[col] = meta["case_id"].map(per_case[col]).values
    cases = cases.drop(columns=[c for c in ("_name",) if c in cases.columns])
    ordered = CASES_COLUMNS + [c for c in cases.columns if c not in CASES_COLUMNS]
    cases = cases[ordered].sort_values("case_id", kind="stable").reset_index(drop=True)
    meta = meta.sort_values(["case_id", "slice"], kind="stable").reset_index(drop=True)
    return cases, meta
