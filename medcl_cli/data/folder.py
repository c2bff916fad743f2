"""The dataset folder contract (design.md section 3), read by every command after `ingest`.

```
DATASET/
  dataset.json        format_version, name, labels {"0": "background", ...}, modality, medcl_version, counts
  cases.csv           one row per case (3D volume): CASE_COLUMNS (+ extra per-case columns, e.g. group, phase)
  meta.csv            one row per slice: case_id, slice, slice_position (+ requested tags, joined columns)
  images/<case_id>.nii.gz   labels/<case_id>.nii.gz   ingest_report.csv   private/ (PHI, only if asked)
```
Paths in cases.csv are relative to the folder; `label` is empty for an unlabelled case. `slice` is the z
index of the NIfTI array (SimpleITK (z, y, x) order); `slice_position` is slice / (n_slices - 1).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from medcl_cli.errors import InputNotFoundError, InvalidDataError

FORMAT_VERSION = 1
CASES_COLUMNS = [
    "case_id",
    "image",
    "label",
    "patient",
    "split",
    "spacing_x",
    "spacing_y",
    "spacing_z",
    "size_x",
    "size_y",
    "size_z",
    "source",
    "modality",
    "series_number",  # DICOM: SeriesNumber (channels joined with +), empty for NIfTI
    "series_description",  # DICOM: SeriesDescription, empty where the PHI guard flags it (data/meta.py)
]
META_BASE_COLUMNS = ["case_id", "slice", "slice_position"]
SPLITS = ("train", "val", "test")


@dataclass
class DatasetFolder:
    root: Path
    info: dict[str, Any]
    cases: pd.DataFrame
    meta: pd.DataFrame

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in self.info.get("labels", {"0": "background"}).items()}

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1 if self.labels else 1

    @property
    def channel_names(self) -> list[str]:
        """The input channels, in order (data/channels.py): `channel_names` of dataset.json, else [modality]."""
        from medcl_cli.data.channels import channel_names_of

        return channel_names_of(self.info)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def image_path(self, case_id: str) -> Path:
        """The image (channel 0 of a multi-channel case)."""
        row = self.cases.loc[self.cases["case_id"] == case_id].iloc[0]
        return self.root / str(row["image"])

    def channel_paths(self, case_id: str) -> list[Path]:
        """Every channel file of a case, in channel order (one path for a single-channel dataset)."""
        from medcl_cli.data.channels import channel_column

        row = self.cases.loc[self.cases["case_id"] == case_id].iloc[0]
        return [self.root / str(row[channel_column(k)]) for k in range(self.num_channels)]

    def label_path(self, case_id: str) -> Path | None:
        row = self.cases.loc[self.cases["case_id"] == case_id].iloc[0]
        lab = row["label"]
        return None if not isinstance(lab, str) or not lab else self.root / lab

    def split_cases(self, split: str) -> pd.DataFrame:
        if split == "all":
            return self.cases
        return self.cases[self.cases["split"] == split]

    def split_counts(self) -> dict[str, dict[str, int]]:
        """{split: {"cases": n, "patients": m}} for the splits that hold cases: a split of 6 cases can be one
        patient, which is what says how far its scores generalise."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            rows = self.cases[self.cases["split"] == split]
            if len(rows):
                out[split] = {"cases": len(rows), "patients": int(rows["patient"].nunique())}
        return out

    def fingerprint(self) -> str:
        """A short hash of the manifest files: what a cache or run was built from."""
        h = hashlib.sha256()
        for name in ("dataset.json", "cases.csv", "meta.csv"):
            p = self.root / name
            if p.exists():
                h.update(p.read_bytes())
        return h.hexdigest()[:16]


def split_summary(counts: dict[str, dict[str, int]]) -> str:
    """`train 4 cases (2 patients), val 6 cases (1 patient)` from `DatasetFolder.split_counts`."""

    def plural(n: int, word: str) -> str:
        return f"{n} {word}" + ("" if n == 1 else "s")

    return ", ".join(f"{split} {plural(c['cases'], 'case')} ({plural(c['patients'], 'patient')})"
                     for split, c in counts.items())


def open_dataset(path: str | Path) -> DatasetFolder:
    """Open a dataset folder written by `medcl ingest`, with clear errors for what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise InputNotFoundError(
            f"dataset folder not found: {root}", "create one with: medcl ingest INPUT... --out DATASET"
        )
    missing = [n for n in ("dataset.json", "cases.csv", "meta.csv") if not (root / n).is_file()]
    if missing:
        raise InvalidDataError(
            f"{root} is not a medcl dataset folder: missing {', '.join(missing)}",
            "create one with: medcl ingest INPUT... --out DATASET (or check the path)",
        )
    try:
        info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidDataError(f"{root / 'dataset.json'} is not valid JSON: {exc}", "re-run medcl ingest") from None
    import pandas as pd  # imported here so `medcl ingest` and `--help` do not pay for it

    try:
        cases = pd.read_csv(root / "cases.csv", dtype={"case_id": str, "patient": str, "label": str, "image": str})
        meta = pd.read_csv(root / "meta.csv", dtype={"case_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InvalidDataError(f"cannot parse the CSV files of {root}: {exc}", "re-run medcl ingest") from None
    absent = [c for c in ("case_id", "image", "label", "patient", "split") if c not in cases.columns]
    if absent:
        raise InvalidDataError(
            f"{root / 'cases.csv'} lacks the column(s) {', '.join(absent)}", "re-run medcl ingest or fix the header"
        )
    cases["label"] = cases["label"].fillna("")
    _check_channels(root, info, cases)
    _check_manifest(root, info, cases)
    return DatasetFolder(root=root, info=info, cases=cases, meta=meta)


def _check_channels(root: Path, info: Any, cases: pd.DataFrame) -> None:
    """A multi-channel dataset (channel_names in dataset.json) has one image column per channel."""
    from medcl_cli.data.channels import channel_column, channel_names_of

    names = channel_names_of(info if isinstance(info, dict) else {})
    absent = [channel_column(k) for k in range(len(names)) if channel_column(k) not in cases.columns]
    if absent:
        raise InvalidDataError(
            f"{root / 'dataset.json'} names {len(names)} channels ({', '.join(names)}) but cases.csv lacks the "
            f"column(s) {', '.join(absent)}",
            "re-run medcl ingest --channels, or fix channel_names / the header of cases.csv",
        )
    for k in range(1, len(names)):
        col = channel_column(k)
        cases[col] = cases[col].fillna("").astype(str)


def _check_manifest(root: Path, info: Any, cases: pd.DataFrame) -> None:
    """Refuse what would make every later command misbehave: a hand-edited case id that is empty, a path
    that is absolute or climbs out of the folder (reads outside the dataset), label keys that are not
    integers."""
    import os
    import re

    bad: list[str] = []
    extra = [c for c in cases.columns if re.fullmatch(r"image_\d{4}", str(c))]
    for i, row in enumerate(cases[["case_id", "image", "label", *extra]].itertuples(index=False), start=2):
        cid, image, label, *more = row
        if not isinstance(cid, str) or not cid.strip():
            bad.append(f"line {i}: empty case_id")
        for img in (image, *more):
            if not isinstance(img, str) or not img.strip():
                bad.append(f"line {i}: empty image path")
        for rel in (image, label, *more):
            if isinstance(rel, str) and rel and (os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == ".."):
                bad.append(f"line {i}: path '{rel}' is outside the dataset folder")
    if bad:
        raise InvalidDataError(
            f"{root / 'cases.csv'} has {len(bad)} bad row(s): {'; '.join(bad[:5])}",
            "paths in cases.csv are relative to the dataset folder; fix the rows or re-run medcl ingest",
        )
    labels = info.get("labels", {}) if isinstance(info, dict) else None
    if not isinstance(labels, dict) or not all(str(k).strip().lstrip("-").isdigit() for k in labels):
        raise InvalidDataError(
            f"{root / 'dataset.json'}: 'labels' must map integer values to names, e.g. {{\"0\": \"background\"}}",
            "fix dataset.json or re-run medcl ingest",
        )


