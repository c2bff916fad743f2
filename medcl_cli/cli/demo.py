"""`medcl demo`: a built-in DICOM dataset through ingest -> pretrain (gcl) -> finetune -> evaluate -> predict."""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from medcl_cli.cli import console
from medcl_cli.cli.options import OverwriteOpt


@contextlib.contextmanager
def _argv(args: list[str]) -> Iterator[None]:
    """sys.argv as if the user had typed the command (run.json records the command from it)."""
    old = sys.argv
    sys.argv = ["medcl", *args]
    try:
        yield
    finally:
        sys.argv = old


def _run(args: list[str], step: int, total: int) -> float:
    """Print the command as a user would type it, then run it through the same Typer app, in-process."""
    from medcl_cli.cli.app import app
    from medcl_cli.errors import MedclError

    console.result(f"\n[{step}/{total}] $ medcl {shlex.join(args)}")
    level = console.VERBOSITY.level
    flags = ["-q"] if level == 0 else (["-v"] if level >= 2 else [])
    t0 = time.perf_counter()
    with _argv(args):
        try:
            code = app(args=[*flags, *args], prog_name="medcl", standalone_mode=False)
        except typer.Abort:  # click's form of Ctrl-C outside standalone mode: report it as an interrupt
            raise KeyboardInterrupt from None
    console.VERBOSITY.level = level
    if code == 130:  # typer turns Ctrl-C into Exit(130), returned (not raised) outside standalone mode
        raise KeyboardInterrupt
    if isinstance(code, int) and code != 0:
        err = MedclError(f"demo step {step} (medcl {args[0]}) exited with code {code}", "see the messages above")
        err.exit_code = code
        raise err
    return time.perf_counter() - t0


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the demo writes.")] = Path("medcl-demo"),
    small: Annotated[bool, typer.Option("--small", help="A tiny version (seconds): fewer, smaller scans and steps.")] = False,
    steps: Annotated[
        Optional[int], typer.Option("--steps", min=1, help="Training steps of both pretrain and finetune.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated scans.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the whole pipeline on a built-in dataset: write a small cine-MR-like DICOM export (8 patients x
    ED/ES cine and mask series, plus one new patient without masks), then ingest -> pretrain (gcl on all
    training scans) -> finetune (masks of 2 patients) -> evaluate -> predict (the new patient), printing
    each command as you would type it. Ends with the test-set results table and where the pictures are.
    About 2 minutes on a 2-core CPU (--small: seconds).

    Example: medcl demo --out demo/
    """
    from medcl_cli.demo import chain as D

    size = D.demo_size(small, steps)
    t0 = time.perf_counter()
    console.info(f"demo folder: {out} (DICOM export, dataset, runs, predictions)")
    dicom, new = D.prepare(out, size, overwrite=overwrite, seed=seed)
    n_files = sum(s.n_slices for s in dicom.series)
    console.result(
        f"demo DICOM: {len(dicom.labelled_patients)} patients x (ED, ES) cine and mask series, {n_files} files in "
        f"{dicom.root}; one more patient without masks in {new.root}"
    )
    total = 5
    timings = {"ingest": _run(D.ingest_command(out, size), 1, total)}
    labelled = min(size.labeled, D.labelled_train_patients(out / "data"))
    commands = D.training_commands(out, size, labelled, D.predict_input(new))
    for i, args in enumerate(commands, start=2):
        timings[args[0]] = _run(args, i, total)
    res = D.read_results(out)
    from medcl_cli.evaluate.scoring import summary_table

    console.result(f"\nresults on the test split ({res.n_cases} scans; gcl pretraining, fine-tuned on {labelled} patients):")
    for line in summary_table(res.summary):
        console.result("  " + line)
    if res.best_val_dice is not None:
        console.result(f"best validation Dice during fine-tuning: {res.best_val_dice:.3f}")
    console.result("pictures:")
    if res.report is not None:
        console.result(f"  report (tables, plots, every case on one page): {res.report}")
    console.result(f"  overlays (image | reference | prediction): {res.eval_dir / 'overlays'} ({len(res.overlays)} PNG)")
    for c in res.curves:
        console.result(f"  training curves: {c}")
    console.result(f"  predicted masks (NIfTI on the scan's grid): {out / 'preds'} ({len(res.predictions)} file(s))")
    console.result(f"all runs: medcl runs {out / 'runs'}")
    console.info(
        "time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {time.perf_counter() - t0:.0f}s"
    )
