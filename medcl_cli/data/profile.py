"""The data profile of a dataset folder or of one input volume: what a model was trained on, in numbers.

Recorded in every training run (run.json `data_profile` and the checkpoint) and compared at `medcl
predict` / `medcl evaluate` time (predict/fit.py) against what the model is asked to segment:

```
{"modality": "MR", "channels": ["T1post", "FLAIR"], "n_channels": 2, "cases": 10,
 "label_series": "Mask",                                      # ingest's --label-series, when it was given
 "spacing_mm": {"min": [x, y, z], "max": [x, y, z]},          # over the cases of cases.csv (x, y, z order)
 "intensity": [{"p1": .., "p50": .., "p99": .., "mean": .., "std": ..}, ...]}   # per channel, training only
```
Spacing comes from cases.csv (no image is read). Intensity statistics of the raw voxels are estimated on
at most `INTENSITY_CASES` cases (every `stride`-th voxel), so recording a profile costs well under a second;
they are informative only (volumes are normalised per case before the network sees them).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import SimpleITK as sitk

from medcl_cli.data.folder import DatasetFolder

INTENSITY_CASES = 3  # cases read for the intensity statistics
_MAX_VOXELS = 200_000  # voxels per case (a regular subsample) the statistics use
UNKNOWN = "unknown"


def _modality(value: Any) -> str:
    text = str(value).strip() if value is not None else ""
    return text if text and text.lower() not in ("nan", "none", UNKNOWN, "image") else UNKNOWN


def spacing_range(folder: DatasetFolder) -> dict[str, list[float]] | None:
    """Smallest and largest spacing (mm) per axis (x, y, z) over the cases; None without spacing columns."""
    cols = ["spacing_x", "spacing_y", "spacing_z"]
    if not all(c in folder.cases.columns for c in cols):
        return None
    values = folder.cases[cols].apply(lambda s: s.astype(float)).to_numpy()
    values = values[np.isfinite(values).all(axis=1)]
    if not len(values):
        return None
    return {"min": [round(float(v), 6) for v in values.min(axis=0)],
            "max": [round(float(v), 6) for v in values.max(axis=0)]}


def intensity_stats(arrays: list[np.ndarray]) -> dict[str, float]:
    """p1, p50, p99, mean and std of the voxels of some arrays (each regularly subsampled)."""
    parts = []
    for a in arrays:
        flat = np.asarray(a).ravel()
        stride = max(1, flat.size // _MAX_VOXELS)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf voxels are dropped below
            parts.append(flat[::stride].astype(np.float64))
    v = np.concatenate(parts) if parts else np.zeros(0, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {}
    p1, p50, p99 = np.percentile(v, [1, 50, 99])
    return {"p1": round(float(p1), 4), "p50": round(float(p50), 4), "p99": round(float(p99), 4),
            "mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4)}


def dataset_profile(folder: DatasetFolder, split: str | None = "train", intensity: bool = True) -> dict[str, Any]:
    """The profile of a dataset folder (the cases of `split`, or all when the split is empty or None)."""
    cases = folder.cases
    if split is not None and "split" in cases.columns and (cases["split"] == split).any():
        folder = DatasetFolder(folder.root, folder.info, cases[cases["split"] == split], folder.meta)
    names = folder.channel_names
    modality = _modality(folder.info.get("modality"))
    if modality == UNKNOWN and "modality" in folder.cases.columns:
        seen = sorted({_modality(m) for m in folder.cases["modality"]} - {UNKNOWN})
        modality = "/".join(seen) if seen else UNKNOWN
    profile: dict[str, Any] = {
        "modality": modality,
        "channels": list(names),
        "n_channels": len(names),
        "cases": len(folder.cases),
        "spacing_mm": spacing_range(folder),
    }
    if folder.info.get("label_series"):  # ingest's --label-series: predict skips such series (mask series)
        profile["label_series"] = str(folder.info["label_series"])
    if intensity:
        per_channel: list[list[np.ndarray]] = [[] for _ in names]
        for cid in list(folder.cases["case_id"])[:INTENSITY_CASES]:
            try:
                for k, path in enumerate(folder.channel_paths(cid)):
                    per_channel[k].append(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))  # a copy: a view dies with its image
            except (RuntimeError, OSError, IndexError):  # a profile never fails a run: skip what cannot be read
                continue
        profile["intensity"] = [intensity_stats(a) for a in per_channel]
    return profile


def image_profile(image: sitk.Image, modality: str | None = None) -> dict[str, Any]:
    """The profile of one input volume (what `medcl predict` compares with the run's profile)."""
    spacing = [round(float(s), 6) for s in image.GetSpacing()]
    if len(spacing) == 2:
        spacing.append(1.0)
    return {
        "modality": _modality(modality),
        "n_channels": int(image.GetNumberOfComponentsPerPixel()),
        "cases": 1,
        "spacing_mm": {"min": spacing, "max": spacing},
    }


# cases.csv / meta.csv columns that describe the file, not the patient or the scan: never a contrastive label
BOOKKEEPING = frozenset({
    "time_index", "flags", "nonfinite_voxels", "series_number", "series_description", "series_uid_hash",
    "modality", "source", "status", "orientation", "SeriesNumber", "SeriesDescription", "InstanceNumber",
})
_IMAGE_COLUMN = re.compile(r"^image_\d{4}$")  # the file of channel k of a multi-channel case (data/channels.py)
MAX_CATEGORIES = 10  # more distinct values than this is an identifier or a measurement, not a category


def categorical_meta(meta_names: list[str], meta_values: dict[str, list[str]], meta: np.ndarray,
                     case: np.ndarray) -> tuple[str, ...]:
    """The meta columns of a slice set (data/dataset.py SliceSet) that are categories of a case: text values
    (not numbers: PatientAge, TriggerTime, SliceLocation are measurements), 2..MAX_CATEGORIES of them,
    constant within each case, and not a bookkeeping column (BOOKKEEPING, `*_raw`, the `image_0001`.. file
    columns of a multi-channel dataset). `patient` and
    `slice_part` are left out: GCL's `auto` takes them anyway. Cardiac `phase` (ED/ES) is the typical one."""
    out = []
    for j, name in enumerate(meta_names):
        values = meta_values.get(name, [])
        if name in ("patient", "slice_part") or name in BOOKKEEPING or name.endswith("_raw") or _IMAGE_COLUMN.match(name):
            continue
        if not 2 <= len(values) <= MAX_CATEGORIES or all(_is_number(v) for v in values):
            continue
        codes = meta[:, j]
        keep = codes >= 0
        pairs = np.unique(np.stack([case[keep], codes[keep]]), axis=1)  # distinct (case, value) pairs
        if pairs.shape[1] == len(np.unique(case[keep])):  # one value per case
            out.append(name)
    return tuple(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
