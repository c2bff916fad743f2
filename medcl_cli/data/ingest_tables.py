"""The tables of a dataset folder: cases.csv rows, meta.csv rows (one per slice), splits and the label map.

Splits are by patient and deterministic: patients are ordered by a seeded hash and cut into test, val and
train, so two cases of one patient never straddle splits and a re-ingest gives the same split.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from medcl_cli.data.dicom.cases import DicomCase
from medcl_cli.data.folder import SPLITS
from medcl_cli.data.meta import meta_cells, normalised_columns, salted_hash
from medcl_cli.errors import InputNotFoundError, UsageError

MetaTable = tuple[list[str], dict[str, dict[str, str]]]  # (columns without case_id, case_id -> row)


def _read_csv(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    if not path.is_file():
        raise InputNotFoundError(f"{what} file not found: {path}", "check the path")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
            return [c.strip() for c in reader.fieldnames or []], rows
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{what} {path} is not a readable CSV: {exc}") from None


def read_meta_csv(path: Path) -> MetaTable:
    """The --meta-csv table keyed by `case_id` (all values as text; the first row of a case wins)."""
    columns, rows = _read_csv(path, "--meta-csv")
    if "case_id" not in columns:
        raise UsageError(f"--meta-csv {path} has no 'case_id' column (found: {', '.join(columns)})",
                         "the first column must be case_id, matching the image file names")
    reserved = {"slice", "slice_position", "split", "image", "label"}
    rename = {c: f"{c}_user" if c in reserved else c for c in columns}
    table: dict[str, dict[str, str]] = {}
    for r in rows:
        table.setdefault(r["case_id"], {rename[k]: v for k, v in r.items() if k != "case_id"})
    return [rename[c] for c in columns if c != "case_id"], table


def read_split_file(path: Path) -> dict[str, str]:
    columns, rows = _read_csv(path, "--split-file")
    if not {"case_id", "split"} <= set(columns):
        raise UsageError(f"--split-file {path} needs the columns case_id,split (found: {', '.join(columns)})")
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise UsageError(f"--split-file {path}: unknown split value(s) {', '.join(bad)}",
                         f"use {', '.join(SPLITS)}")
    return {r["case_id"]: r["split"] for r in rows}


def patient_split(patients: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """patient -> split, deterministic for a seed (at least one val patient when val_fraction > 0)."""
    uniq = sorted(set(patients), key=lambda p: salted_hash(p, f"split-{seed}", 16))
    n = len(uniq)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if n >= 2 and val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_test + n_val >= n:  # always keep a training patient
        n_val = max(0, min(n_val, n - 1 - n_test))
        n_test = max(0, min(n_test, n - 1))
    out = {}
    for i, p in enumerate(uniq):
        out[p] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return out


def dicom_meta_rows(case: DicomCase, public: list[str], phi: list[str], scrub: Callable[[str], str] = str,
                    scrubbed: Collection[str] = ()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(meta rows, private PHI rows) of one DICOM case, ordered like the NIfTI z axis; the values of the
    `scrubbed` keywords (free text allowed by --allow-phi-tags) go through `scrub` (data/phi.py)."""
    conv, plan = case.conv, case.plan
    n = conv.size[2]
    rows, private = [], []
    exact = plan.mosaic == 0 and plan.resample_to is None and plan.shifts is None
    normal = np.asarray(plan.normal)
    for k in range(n):
        fr = plan.frames[conv.slice_frames[k]]
        row: dict[str, Any] = {"case_id": case.case_id, "slice": k, "slice_position": k / (n - 1) if n > 1 else 0.0}
        for key in public:
            value = fr.tags.get(key, "")
            if key == "SliceLocation" and (value == "" or not exact):
                value = repr(round(conv.slice_positions[k], 6))
            elif key == "ImagePositionPatient" and (value == "" or not exact):
                p = np.asarray(conv.origin) + k * conv.spacing[2] * normal
                value = "\\".join(repr(round(float(v), 6)) for v in p)
            row.update(meta_cells(key, scrub(value) if key in scrubbed else value))
        rows.append(row)
        if phi:
            private.append({"case_id": case.case_id, "slice": k, **{key: fr.tags.get(key, "") for key in phi}})
    return rows, private


def volume_meta_rows(case_id: str, n: int, public: list[str]) -> list[dict[str, Any]]:
    rows = []
    for k in range(n):
        row: dict[str, Any] = {"case_id": case_id, "slice": k, "slice_position": k / (n - 1) if n > 1 else 0.0}
        for key in public:
            row[key] = ""
            row.update({c: "" for c in normalised_columns(key, "")})
        rows.append(row)
    return rows


def label_map(values: set[int], names: dict[int, str]) -> dict[str, str]:
    """{"0": "background", "1": ...}: every value found, named by --label-names, SEG labels or class_N."""
    out = {"0": names.get(0, "background")}
    for v in sorted(values | set(names)):
        if v != 0:
            out[str(v)] = names.get(v, f"class_{v}")
    return out
