"""`medcl evaluate` as a library: predict every labelled case of a split per 3D volume and score it.

Writes `metrics_per_case.csv`, `metrics_summary.csv` and `summary.json` (metrics.py documents the
columns and the empty-mask rule) and, with overlays, one PNG per case. Cases without a label are skipped
with a note; the label map of the run must equal the dataset's, so class 2 means the same thing in both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from medcl_cli.core.files import write_csv_atomic, write_json_atomic, write_text_atomic
from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.channels import channel_arrays, read_channels
from medcl_cli.data.folder import SPLITS, DatasetFolder
from medcl_cli.data.io import grid_difference, read_image, same_grid
from medcl_cli.errors import (
    InputNotFoundError,
    InvalidDataError,
    OutputError,
    UsageError,
)
from medcl_cli.evaluate import metrics
from medcl_cli.predict.inference import (
    DEFAULT_BATCH,
    LoadedModel,
    predict_image,
    volume_array,
)

TASK = "evaluate"
EVAL_SPLITS = (*SPLITS, "all")


@dataclass
class EvalResult:
    out: Path
    per_case: pd.DataFrame
    summary: pd.DataFrame
    summary_json: dict[str, Any]
    skipped: list[str] = field(default_factory=list)


def check_label_maps(model: LoadedModel, ds: DatasetFolder) -> None:
    """The run and the dataset must name the same classes with the same ids."""
    if model.label_map != ds.labels:
        fmt = lambda m: ", ".join(f"{k}={v}" for k, v in sorted(m.items()))  # noqa: E731
        raise InvalidDataError(
            f"label map of the run ({fmt(model.label_map)}) differs from the dataset's ({fmt(ds.labels)}) in {ds.root}",
            "evaluate on a dataset ingested with the same --label-names (or fine-tune a run on this dataset)",
        )


def check_channels(model: LoadedModel, ds: DatasetFolder, rep: Reporter) -> None:
    """The run must read as many channels as the dataset has; other names in the same count are a warning
    (a renamed sequence is common, a swapped order is not detectable from names alone)."""
    theirs, ours = model.channel_names, ds.channel_names
    if len(theirs) != len(ours):
        raise InvalidDataError(
            f"the run was trained on {len(theirs)} input channel(s) ({', '.join(theirs)}), the dataset {ds.root} "
            f"has {len(ours)} ({', '.join(ours)})",
            "evaluate on a dataset ingested with the run's --channels (same names, same order)",
        )
    if len(ours) > 1 and [t.lower() for t in theirs] != [o.lower() for o in ours]:
        rep.log(f"channel names differ: run {', '.join(theirs)}, dataset {', '.join(ours)} (matched by order)", "warning")


def select_cases(ds: DatasetFolder, split: str) -> pd.DataFrame:
    """The rows of `split`, with a clear error when the dataset has none."""
    if split not in EVAL_SPLITS:
        raise UsageError(f"unknown split '{split}'", f"use one of {', '.join(EVAL_SPLITS)}")
    rows = ds.split_cases(split)
    if rows.empty:
        counts = ds.cases["split"].value_counts().to_dict()
        have = ", ".join(f"{k} ({v} cases)" for k, v in sorted(counts.items())) or "no cases"
        raise InputNotFoundError(
            f"dataset {ds.root} has no '{split}' cases (it has: {have})",
            "choose another --split, or re-ingest with --split-file / test_fraction to create it",
        )
    return rows


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out} exists and is not empty", "give --overwrite or another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror}", "choose a writable --out") from None


def evaluate_case(
    model: LoadedModel,
    image: sitk.Image,
    label: sitk.Image,
    case_id: str,
    batch_size: int,
    nsd_tolerance_mm: float = metrics.NSD_TOLERANCE_MM,
) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray, np.ndarray]:
    """Metric rows of one case, plus the image, reference and prediction arrays (z, y, x)."""
    if not same_grid(image, label, tol=1e-3):
        raise InvalidDataError(
            f"case {case_id}: label grid differs from the image grid ({grid_difference(image, label)})",
            "re-run medcl ingest (medcl validate lists such cases)",
        )
    pred_img = predict_image(model, image, batch_size)
    pred, ref = volume_array(pred_img), volume_array(label).astype(np.int64)
    spacing = tuple(reversed(image.GetSpacing()))
    if image.GetDimension() == 2:  # one slice: the z spacing does not enter any 2D distance
        spacing = (1.0, *spacing)
    rows = metrics.case_metrics(case_id, pred, ref, spacing, model.label_map, nsd_tolerance_mm)
    return rows, channel_arrays(image)[0], ref, pred  # overlays show channel 0


def evaluate_dataset(
    model: LoadedModel,
    ds: DatasetFolder,
    split: str,
    out: Path,
    overlays: bool = False,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH,
    nsd_tolerance_mm: float = metrics.NSD_TOLERANCE_MM,
    reporter: Reporter | None = None,
    report: bool = False,
    strict: bool = False,
) -> EvalResult:
    """Score every labelled case of `split`; write the CSVs, summary.json and (optionally) overlays and
    the self-contained `report.html`. A pretraining-only run is refused (exit 4); a split far from the
    run's training data (predict/fit.py) is a warning, or with `strict` a refusal (exit 4)."""
    from medcl_cli.data.profile import dataset_profile
    from medcl_cli.predict.fit import check_fit, require_trained_head

    rep = reporter or NullReporter()
    require_trained_head(model.segmentation_trained, str(model.run_dir), model.method)
    check_label_maps(model, ds)
    check_channels(model, ds, rep)
    rows_split = select_cases(ds, split)
    labelled = rows_split[rows_split["label"].astype(str).str.len() > 0]
    skipped = sorted(set(rows_split["case_id"]) - set(labelled["case_id"]))
    if skipped:
        rep.log(f"{len(skipped)} case(s) of '{split}' have no label and are skipped: {', '.join(skipped[:5])}"
                + (" ..." if len(skipped) > 5 else ""))
    if labelled.empty:
        raise InputNotFoundError(
            f"no labelled cases in split '{split}' of {ds.root}", "evaluate a split whose cases have masks"
        )
    given = dataset_profile(ds, split if split != "all" else None, intensity=False)
    fit_notes = check_fit(model.profile, given, f"split '{split}' of {ds.root}", strict)
    for note in fit_notes:
        rep.log(f"{note} (scores may be poor; --strict refuses)", "warning")
    prepare_out(out, overwrite)
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    panels: dict[str, str] = {}  # case_id -> PNG data URI for report.html
    rep.start(TASK, len(labelled))
    for case_id in labelled["case_id"]:
        t0 = time.perf_counter()
        label_path = ds.label_path(case_id)
        if label_path is None:  # filtered above; kept for the type checker
            continue
        image, label = read_channels(ds.channel_paths(case_id)), read_image(label_path)
        case_rows, img, ref, pred = evaluate_case(model, image, label, case_id, batch_size, nsd_tolerance_mm)
        rows.extend(case_rows)
        if overlays:
            from medcl_cli.evaluate.overlays import write_overlay

            mean_dice = float(np.mean([r["dice"] for r in case_rows])) if case_rows else float("nan")
            spacing = tuple(reversed(image.GetSpacing()))
            write_overlay(img, ref, pred, spacing, out / "overlays" / f"{case_id}.png",
                          f"{case_id}  mean Dice {mean_dice:.3f}", {k: v for k, v in model.label_map.items() if k > 0})
        if report:
            from medcl_cli.evaluate.report_html import case_panel

            panels[case_id] = case_panel(img, ref, pred, tuple(reversed(image.GetSpacing())), len(model.label_map))
        seconds[case_id] = time.perf_counter() - t0
        fg = [float(r["dice"]) for r in case_rows]
        rep.advance(TASK, 1, case=case_id, dice=float(np.mean(fg)) if fg else float("nan"))
    rep.finish(TASK)
    per_case = metrics.per_case_frame(rows)
    summary = metrics.summarize(per_case)
    js = metrics.summary_dict(per_case, summary)
    worst = per_case.groupby("case_id")["dice"].mean().sort_values().head(5)
    js.update(
        {
            "run_id": model.run_id,
            "checkpoint": str(model.checkpoint),
            "method": model.method,
            "dataset": str(ds.root),
            "dataset_fingerprint": ds.fingerprint(),
            "split": split,
            "nsd_tolerance_mm": nsd_tolerance_mm,
            "skipped_unlabelled": skipped,
            "fit_warnings": fit_notes,
            "worst_cases": [{"case_id": c, "mean_dice": float(d)} for c, d in worst.items()],
            "seconds_per_case": float(np.mean(list(seconds.values()))) if seconds else 0.0,
            "overlays": "overlays/" if overlays else None,
            "report": "report.html" if report else None,
        }
    )
    write_csv_atomic(per_case, out / "metrics_per_case.csv")
    write_csv_atomic(summary, out / "metrics_summary.csv")
    write_json_atomic(js, out / "summary.json")
    if report:
        from medcl_cli.evaluate.report_html import render_report

        write_text_atomic(render_report(per_case, summary, js, panels), out / "report.html")
    return EvalResult(out=out, per_case=per_case, summary=summary, summary_json=js, skipped=skipped)


def summary_table(summary: pd.DataFrame) -> list[str]:
    """The summary as aligned text lines (one per class): what `medcl evaluate` prints on stdout."""
    lines = [f"{'label':<18} {'dice':>15} {'iou':>15} {'hd95_mm':>17} {'nsd':>15} {'n':>4} {'n_nan':>5}"]
    for label, df in summary.groupby("label", sort=False):
        m = {r["metric"]: r for r in df.to_dict("records")}
        cell = lambda k, w: f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}".rjust(w)  # noqa: E731
        n_nan = sum(int(m[k]["n_nan"]) for k in metrics.METRICS)
        lines.append(f"{str(label):<18} {cell('dice', 15)} {cell('iou', 15)} {cell('hd95_mm', 17)} {cell('nsd', 15)} {int(m['dice']['n']):>4} {n_nan:>5}")
    return lines
