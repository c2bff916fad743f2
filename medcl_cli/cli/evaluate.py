"""`medcl evaluate`: Dice, IoU and HD95 per case and class of a run on a dataset split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medcl_cli.cli import console
from medcl_cli.cli.options import DeviceOpt, JsonOpt, OverwriteOpt, StrictOpt


def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder of medcl finetune (or a checkpoint .pt file).")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder written by medcl ingest.")],
    split: Annotated[str, typer.Option("--split", help="Cases to score: test | val | train | all.")] = "test",
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder (default: RUN/eval_<split>/).")
    ] = None,
    overlays: Annotated[
        bool, typer.Option("--overlays", help="Also write one PNG per case (image, reference, prediction).")
    ] = False,
    report: Annotated[
        bool, typer.Option("--report", help="Also write report.html: one self-contained page with tables, plots and cases.")
    ] = False,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", min=1, help="Slices per forward pass (inference.batch_size, default 16).")
    ] = None,
    nsd_tolerance: Annotated[
        Optional[float], typer.Option("--nsd-tolerance", min=0.0, help="NSD tolerance in mm (default 1.0).")
    ] = None,
    strict: StrictOpt = False,
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Predict every labelled case of a split per 3D volume and score it (Dice, IoU, HD95 in mm, NSD, volumes).

    Writes metrics_per_case.csv, metrics_summary.csv and summary.json (mean, median, std, n, n_nan per
    class and the mean over foreground classes); an empty prediction or reference is scored by the
    documented rule (Dice 0, HD95 = image diagonal), never dropped. Cases without a mask are skipped.
    A pretraining-only run is refused (exit 4: fine-tune it first); a split far from the run's training data
    (modality, channels, in-plane spacing) is a warning, or with --strict exit 4.

    Example: medcl evaluate runs/ft --data data/ --split val --overlays --report
    """
    from medcl_cli.cli.console import ConsoleReporter
    from medcl_cli.config import InferenceConfig
    from medcl_cli.data.folder import open_dataset
    from medcl_cli.engine.device import describe, resolve_device
    from medcl_cli.evaluate.scoring import evaluate_dataset, summary_table
    from medcl_cli.predict.inference import load_model

    dev = resolve_device(device or "auto")
    console.info(f"device: {describe(dev)}")
    model = load_model(run, dev)
    ds = open_dataset(data)
    run_folder = run if run.is_dir() else model.checkpoint.parent.parent
    out_dir = out or (run_folder / f"eval_{split}")
    res = evaluate_dataset(
        model, ds, split, out_dir, overlays=overlays, overwrite=overwrite,
        batch_size=batch_size or InferenceConfig().batch_size,
        nsd_tolerance_mm=InferenceConfig().nsd_tolerance_mm if nsd_tolerance is None else nsd_tolerance,
        reporter=ConsoleReporter(), report=report, strict=strict,
    )
    if as_json:
        console.result(json.dumps(res.summary_json, indent=2))
        return
    n = res.summary_json["n_cases"]
    console.result(f"{n} case(s) of '{split}' scored with run {model.run_id} ({model.method})")
    for line in summary_table(res.summary):
        console.result(line)
    worst = res.summary_json["worst_cases"][:3]
    if worst:
        console.result("worst cases: " + ", ".join(f"{w['case_id']} ({w['mean_dice']:.3f})" for w in worst))
    console.result(f"results: {out_dir}")
    if report:
        console.result(f"report: {out_dir / 'report.html'}")
    console.info(f"next: medcl predict {run} SCAN.nii.gz --out preds/")
