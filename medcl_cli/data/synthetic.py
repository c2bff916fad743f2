"""Small synthetic cardiac-like volumes in the dataset folder contract (data/folder.py).

Each case is a short stack of slices with three nested structures, like ACDC's short-axis cine MRI:
class 3 a bright disk (LV cavity), class 2 a dark ring around it (myocardium) and class 1 a crescent
beside it (RV cavity). Their radii shrink from base to apex (slice position) and at end-systole (phase),
so the meta labels GCL uses (patient, phase, slice position) really change what a slice looks like.
Intensities get a smooth bias field and Gaussian noise. Used by the tests of every part and by
`medcl demo`; vectorised numpy, a few milliseconds per volume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from medcl_cli import __version__
from medcl_cli.core.files import write_csv_atomic, write_json_atomic
from medcl_cli.data.folder import CASES_COLUMNS, FORMAT_VERSION
from medcl_cli.data.io import write_image
from medcl_cli.errors import OutputError, UsageError

LABELS = {"0": "background", "1": "rv_cavity", "2": "myocardium", "3": "lv_cavity"}
PHASES = ("ED", "ES")
GROUPS = ("DCM", "HCM", "NOR")


def synth_volume(
    rng: np.random.Generator, n_slices: int, shape_yx: tuple[int, int], phase: str, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """One (image float32, label uint8) pair of shape (z, y, x)."""
    h, w = shape_yx
    z = np.linspace(0.0, 1.0, n_slices, dtype=np.float32)[:, None, None]
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    cy = h / 2 + rng.uniform(-0.06, 0.06) * h
    cx = w / 2 + rng.uniform(-0.06, 0.06) * w
    size = min(h, w) * scale
    shrink = (1.0 - 0.55 * z) * (0.8 if phase == "ES" else 1.0)  # apex and systole are smaller
    r_lv = 0.16 * size * shrink
    wall = 0.07 * size * (1.0 - 0.3 * z) * (1.25 if phase == "ES" else 1.0)  # the wall thickens in systole
    d_lv = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)[None]
    rv_cx = cx - (r_lv + wall) * 1.35
    d_rv = np.sqrt(((yy - cy) / 1.25) ** 2 + (xx - rv_cx) ** 2)
    label = np.zeros((n_slices, h, w), dtype=np.uint8)
    rv = (d_rv < r_lv * 1.1 * (1.0 - 0.4 * z)) & (d_lv > r_lv + wall)
    label[rv] = 1
    label[(d_lv <= r_lv + wall) & (d_lv > r_lv)] = 2
    label[d_lv <= r_lv] = 3
    means = np.array([0.25, 0.8, 0.35, 0.9], dtype=np.float32)
    image = means[label]
    bias = 1.0 + 0.15 * np.sin(yy / h * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, np.pi))[None]
    shaded = image * bias + rng.normal(0.0, 0.06, size=image.shape).astype(np.float32)
    return np.clip(shaded, 0.0, None).astype(np.float32) * 400.0, label


def make_synthetic_dataset(
    out: str | Path,
    n_patients: int = 6,
    n_slices: int = 8,
    shape_yx: tuple[int, int] = (40, 48),
    val_patients: int = 2,
    test_patients: int = 0,
    unlabeled_patients: int = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a dataset folder of `n_patients` x (ED, ES) cases; the first patients are `val`, then `test`,
    the rest `train`; the last `unlabeled_patients` training patients have no label files."""
    root = Path(out)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise OutputError(f"{root} exists and is not empty", "choose another folder or pass overwrite")
    if val_patients + test_patients >= n_patients or n_slices < 2:
        raise UsageError("a synthetic dataset needs at least one training patient and two slices per case")
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    cases, metas = [], []
    for p in range(n_patients):
        patient = f"patient{p + 1:03d}"
        split = "val" if p < val_patients else ("test" if p < val_patients + test_patients else "train")
        labelled = p < n_patients - unlabeled_patients or split != "train"
        group = GROUPS[p % len(GROUPS)]
        scale = rng.uniform(0.85, 1.15)
        nz = int(n_slices + rng.integers(-1, 2))
        for f, phase in enumerate(PHASES):
            case_id = f"{patient}_frame{f + 1:02d}"
            image, label = synth_volume(rng, nz, shape_yx, phase, scale)
            spacing = (1.5, 1.5, 10.0)
            img = sitk.GetImageFromArray(image)
            img.SetSpacing(spacing)
            write_image(img, root / "images" / f"{case_id}.nii.gz", verify=False)
            if labelled:
                lab = sitk.GetImageFromArray(label)
                lab.CopyInformation(img)
                write_image(lab, root / "labels" / f"{case_id}.nii.gz", verify=False)
            cases.append(
                {
                    "case_id": case_id,
                    "image": f"images/{case_id}.nii.gz",
                    "label": f"labels/{case_id}.nii.gz" if labelled else "",
                    "patient": patient,
                    "split": split,
                    "spacing_x": spacing[0],
                    "spacing_y": spacing[1],
                    "spacing_z": spacing[2],
                    "size_x": shape_yx[1],
                    "size_y": shape_yx[0],
                    "size_z": nz,
                    "source": "synthetic",
                    "modality": "MR",
                    "group": group,
                    "phase": phase,
                }
            )
            for s in range(nz):
                metas.append(
                    {"case_id": case_id, "slice": s, "slice_position": s / (nz - 1), "phase": phase, "group": group}
                )
    cases_df = pd.DataFrame(cases, columns=CASES_COLUMNS + ["group", "phase"])
    write_csv_atomic(cases_df, root / "cases.csv")
    write_csv_atomic(pd.DataFrame(metas), root / "meta.csv")
    info = {
        "format_version": FORMAT_VERSION,
        "name": "synthetic",
        "labels": LABELS,
        "modality": "MR",
        "medcl_version": __version__,
        "counts": {
            "cases": len(cases_df),
            "patients": n_patients,
            "slices": len(metas),
            "labelled_cases": int((cases_df["label"] != "").sum()),
            **{s: int((cases_df["split"] == s).sum()) for s in ("train", "val", "test")},
        },
        "source": "medcl synthetic generator (seed %d)" % seed,
    }
    write_json_atomic(info, root / "dataset.json")
    (root / "README.txt").write_text(json.dumps({"generator": "medcl_cli.data.synthetic", "seed": seed}) + "\n")
    return root
