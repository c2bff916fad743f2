"""`medcl demo`, library side: the built-in DICOM dataset, the command lines of the pipeline, the results.

The demo is the README's "run the main job": it writes a small cine-MR-like DICOM export
(`demo/dicom_writer.py`), then runs ingest -> pretrain (gcl) -> finetune -> evaluate -> predict exactly
as a user would type them. This module plans those command lines and reads the results back; the CLI
(`cli/demo.py`) runs each line through the same Typer app in-process, so the demo can never drift from
the commands. Everything lands under one folder:

```
DIR/dicom/<PatientID>/<series>/IM*.dcm   the export to ingest (image series + "Mask" series)
DIR/new_scans/<PatientID>/...             one more patient, no masks: what predict segments
DIR/demo.yaml                             the CPU-sized config the training commands use (--config)
DIR/data/                                 medcl ingest output (dataset folder)
DIR/runs/gcl/  DIR/runs/ft/               pretrain and finetune run folders (run.json, curves.png, ...)
DIR/runs/ft/eval_test/                    medcl evaluate output (summary, per-case CSV, overlays/*.png, report.html)
DIR/preds/                                medcl predict output for the new patient's DICOM series
```
Every ingested patient has mask series, so the val and test splits (drawn by ingest, per patient) always
have references to score against; label efficiency is what `finetune --labeled N` shows: the network is
fine-tuned on the masks of N training patients only, after GCL pretraining on all training scans.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from medcl_cli.core.files import make_tempdir
from medcl_cli.core.runfolder import read_run_info
from medcl_cli.demo.dicom_writer import (
    MASK_DESCRIPTION,
    DemoDicom,
    label_names_option,
    write_demo_dicom,
)
from medcl_cli.errors import InvalidDataError, OutputError, UsageError

DEMO_ENTRIES = ("dicom", "new_scans", "demo.yaml", "data", "runs", "preds")
META_TAGS = "PatientAge,SliceLocation,TriggerTime"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the default finishes in about 2 minutes on a 2-core CPU."""

    patients: int = 8  # ingested patients (each with ED + ES image and mask series)
    labeled: int = 2  # training patients whose masks fine-tuning uses (finetune --labeled)
    slices: int = 8
    size: int = 64  # DICOM matrix (rows = columns)
    image_size: int = 48  # training slice size
    channels: tuple[int, ...] = (8, 16, 32, 64)
    batch_size: int = 8
    pretrain_steps: int = 150
    finetune_steps: int = 200
    val_every: int = 50
    test_fraction: float = 0.25


SIZES = {
    "default": DemoSize(),
    # for tests: same pipeline, every part exercised, seconds instead of minutes
    "small": DemoSize(patients=5, labeled=1, slices=5, size=32, image_size=32, channels=(8, 16, 32),
                      batch_size=4, pretrain_steps=3, finetune_steps=6, val_every=3, test_fraction=0.2),
}


def demo_size(small: bool, steps: int | None) -> DemoSize:
    """The preset, with `steps` (if given) replacing both the pretrain and the finetune step counts."""
    size = SIZES["small" if small else "default"]
    if steps is not None:
        if steps < 1:
            raise UsageError(f"--steps must be at least 1, found {steps}")
        from dataclasses import replace

        size = replace(size, pretrain_steps=steps, finetune_steps=steps, val_every=min(size.val_every, steps))
    return size


def demo_config(size: DemoSize) -> dict[str, Any]:
    """The contents of DIR/demo.yaml: a CPU-sized network and GCL's meta labels for this DICOM export."""
    return {
        "data": {"image_size": size.image_size},
        "model": {"channels": list(size.channels)},
        "train": {"batch_size": size.batch_size, "val_every": size.val_every},
        # TriggerTime (0 ms ED, ~300 ms ES) is the cardiac phase as DICOM stores it
        "gcl": {"meta_labels": ["patient", "TriggerTime", "slice_part"]},
    }


def prepare(out: Path, size: DemoSize, overwrite: bool = False, seed: int = 0) -> tuple[DemoDicom, DemoDicom]:
    """Check DIR, write DIR/dicom and DIR/new_scans (each atomically) and DIR/demo.yaml; return both exports."""
    from medcl_cli.config import load_config

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is a file", "choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"--out {out} exists and is not empty", "pass --overwrite to replace the demo, or choose another folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES)
        if foreign:
            raise OutputError(
                f"--out {out} holds files the demo did not write ({', '.join(foreign[:3])})",
                "choose an empty or new folder; --overwrite only replaces a previous demo",
            )
        from medcl_cli.engine.runs import clear_run_files

        clear_run_files(out, DEMO_ENTRIES)
    out.mkdir(parents=True, exist_ok=True)
    demo = _write_atomic(out / "dicom", size, size.patients, size.patients, seed, 1)
    new = _write_atomic(out / "new_scans", size, 1, 0, seed, size.patients + 1)
    cfg_path = out / "demo.yaml"
    text = "# medcl demo: a CPU-sized network (see medcl_cli/demo/chain.py); any medcl config key can go here\n"
    cfg_path.write_text(text + yaml.safe_dump(demo_config(size), sort_keys=False), encoding="utf-8")
    load_config([cfg_path])  # fail here, not in step 2, if a key went stale
    return demo, new


def _write_atomic(target: Path, size: DemoSize, patients: int, labelled: int, seed: int, first: int) -> DemoDicom:
    tmp = make_tempdir(f".tmp-{target.name}-", target.parent)
    try:
        demo = write_demo_dicom(tmp, patients, labelled, size.slices, size.size, seed, first)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    demo.root = target
    for s in demo.series:
        s.folder = target / s.folder.relative_to(tmp)
    return demo


def ingest_command(out: Path, size: DemoSize) -> list[str]:
    return [
        "ingest", str(out / "dicom"), "--out", str(out / "data"),
        "--label-series", MASK_DESCRIPTION, "--label-names", label_names_option(),
        "--meta", META_TAGS, "--test-fraction", str(size.test_fraction),
    ]


def labelled_train_patients(data: Path) -> int:
    """Patients of the train split with masks; checks that val and test have a labelled case to score."""
    from medcl_cli.data.folder import open_dataset

    ds = open_dataset(data)
    c = ds.cases
    labelled = c["label"].astype(str).str.len() > 0
    for split in ("val", "test"):
        if not (labelled & (c["split"] == split)).any():
            raise InvalidDataError(
                f"the demo dataset has no labelled case in its '{split}' split", "run the demo with another --seed"
            )
    n = int(c.loc[labelled & (c["split"] == "train"), "patient"].nunique())
    if n == 0:
        raise InvalidDataError("the demo dataset has no labelled training patient", "run the demo with another --seed")
    return n


def training_commands(out: Path, size: DemoSize, labelled: int, predict_input: Path) -> list[list[str]]:
    """pretrain (gcl) -> finetune -> evaluate -> predict, as typed on a command line."""
    data, cfg, gcl, ft = out / "data", out / "demo.yaml", out / "runs" / "gcl", out / "runs" / "ft"
    return [
        ["pretrain", "--data", str(data), "--method", "gcl", "--config", str(cfg),
         "--steps", str(size.pretrain_steps), "--out", str(gcl)],
        ["finetune", "--data", str(data), "--init-from", str(gcl), "--labeled", str(labelled), "--config", str(cfg),
         "--steps", str(size.finetune_steps), "--out", str(ft)],
        ["evaluate", str(ft), "--data", str(data), "--split", "test", "--overlays", "--report"],
        ["predict", str(ft), str(predict_input), "--out", str(out / "preds")],
    ]


def predict_input(new: DemoDicom) -> Path:
    """The DICOM folder of the patient that was not ingested: the 'new scan' predict segments."""
    return new.patient_folder(new.unlabelled_patients[0])


@dataclass
class DemoResults:
    summary: pd.DataFrame  # metrics_summary.csv of the test evaluation
    n_cases: int
    eval_dir: Path
    overlays: list[Path]
    report: Path | None  # report.html of the evaluation (tables, plots, cases on one page)
    curves: list[Path]
    predictions: list[Path]
    best_val_dice: float | None


def read_results(out: Path) -> DemoResults:
    """What the pipeline produced: the test summary, the pictures and the predicted masks."""
    import json

    eval_dir = out / "runs" / "ft" / "eval_test"
    summary = pd.read_csv(eval_dir / "metrics_summary.csv")
    js = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    run = read_run_info(out / "runs" / "ft")
    best = (run.get("best") or {}).get("value")
    return DemoResults(
        summary=summary,
        n_cases=int(js.get("n_cases", 0)),
        eval_dir=eval_dir,
        overlays=sorted((eval_dir / "overlays").glob("*.png")),
        report=eval_dir / "report.html" if (eval_dir / "report.html").is_file() else None,
        curves=[p for p in (out / "runs" / "gcl" / "curves.png", out / "runs" / "ft" / "curves.png") if p.is_file()],
        predictions=sorted((out / "preds").glob("*.nii.gz")),
        best_val_dice=float(best) if isinstance(best, (int, float)) else None,
    )
