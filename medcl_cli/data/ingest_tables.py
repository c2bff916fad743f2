"""The tables of a dataset folder: cases.csv rows, meta.csv rows (one per slice), splits and the label map.

Splits are by patient and deterministic: patients are ordered by a seeded hash and cut into test, val and
train, so two cases of one patient never straddle splits and a re-ingest gives the same split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medcl_cli.data.dicom import DicomCase
from medcl_cli.data.folder import SPLITS
from medcl_cli.data.meta import normalised_columns, salted_hash
from medcl_cli.errors import InputNotFoundError, UsageError


def read_meta_csv(path: Path) -> pd.DataFrame:
    """The --meta-csv table, keyed by `case_id` (all columns as text)."""
    if not path.is_file():
        raise InputNotFoundError(f"--meta-csv file not found: {path}", "check the path")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "case_id" not in df.columns:
        raise UsageError(f"--meta-csv {path} has no 'case_id' column (found: {', '.join(df.columns)})",
                         "the first column must be case_id, matching the image file names")
    reserved = {"slice", "slice_position", "split", "image", "label"}
    clash = sorted(reserved & set(df.columns))
    if clash:
        df = df.rename(columns={c: f"{c}_user" for c in clash})
    return df.drop_duplicates("case_id", keep="first").set_index("case_id")


def read_split_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise InputNotFoundError(f"--split-file not found: {path}", "check the path")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"case_id", "split"} <= set(df.columns):
        raise UsageError(f"--split-file {path} needs the columns case_id,split (found: {', '.join(df.columns)})")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise UsageError(f"--split-file {path}: unknown split value(s) {', '.join(bad)}",
                         f"use {', '.join(SPLITS)}")
    return dict(zip(df["case_id"], df["split"]))


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


def dicom_meta_rows(case: DicomCase, public: list[str], phi: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(meta rows, private PHI rows) of one DICOM case, ordered like the NIfTI z axis."""
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
            row[key] = value
            row.update(normalised_columns(key, value))
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
