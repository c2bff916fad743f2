"""The run folder (docs/run-format.md): run.json, config.yaml, metrics.csv, events.jsonl, log.txt,
checkpoints/, curves.png. Only rank 0 writes; every file is replaced atomically or appended line-wise,
so a crash never leaves a file that looks complete but is not.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

from medcl_cli.core.files import (
    atomic_path,
    remove_stale_temporaries,
    safe_row,
)
from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.core.runfolder import (
    RUN_JSON,
    read_run_info,
    run_json_path,
    write_run_info,
)
from medcl_cli.errors import InputNotFoundError, OutputError

RUN_FILES = (RUN_JSON, "config.yaml", "metrics.csv", "events.jsonl", "log.txt", "curves.png", "checkpoints")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty folder unless --overwrite or --resume (exit 6); --resume needs last.pt."""
    if resume:
        if not (out / "checkpoints" / "last.pt").is_file():
            raise InputNotFoundError(
                f"cannot resume: {out / 'checkpoints' / 'last.pt'} not found",
                "give the run folder of an interrupted pretrain/finetune (its --out)",
            )
        return
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is a file", "choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"--out {out} exists and is not empty",
            "pass --overwrite to replace it, --resume to continue it, or choose another folder",
        )


def clear_run_files(out: Path, names: tuple[str, ...] | list[str] = RUN_FILES) -> None:
    """With --overwrite: remove what a previous run wrote (`names`; other files are left alone)."""
    for name in names:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class RunFolder:
    """Writer of one run folder; a no-op on ranks other than 0 (`active=False`)."""

    def __init__(self, root: Path, active: bool = True) -> None:
        self.root = root
        self.active = active
        self.ckpt_dir = root / "checkpoints"
        self.info: dict[str, Any] = {}
        self._rows: list[list[Any]] = []
        self._pending: list[str] = []  # log lines before start(): nothing is written for a run that never starts
        self.started = False

    def start(self, info: dict[str, Any], config_yaml: str, resume_step: int | None) -> None:
        if not self.active:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.started = True
        if self._pending:
            with open(self.root / "log.txt", "a", encoding="utf-8") as fh:
                fh.writelines(self._pending)
            self._pending.clear()
        if resume_step is not None:  # what the killed run's interrupted writes left
            remove_stale_temporaries(self.root)
            remove_stale_temporaries(self.ckpt_dir)
        if resume_step is not None and run_json_path(self.root).is_file():
            prev = read_run_info(self.root)
            info = {**prev, **info, "resumed": prev.get("resumed", []) + [{"at_step": resume_step, "time": now()}]}
            self._truncate_metrics(resume_step)
        else:
            (self.root / "config.yaml").write_text(config_yaml, encoding="utf-8")
        if not (self.root / "metrics.csv").is_file():
            with open(self.root / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(["step", "split", "metric", "value"])
        self.info = {**info, "status": "running", "exit_code": None}
        self.save_info()

    def _truncate_metrics(self, step: int) -> None:
        path = self.root / "metrics.csv"
        if not path.is_file():
            return
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
        with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(keep)

    def save_info(self) -> None:
        if self.active and self.started:
            write_run_info(self.info, self.root)

    def metric(self, step: int, split: str, name: str, value: float) -> None:
        if self.active:
            self._rows.append([step, split, name, f"{value:.6g}"])

    def flush(self) -> None:
        if self.active and self.started and self._rows:
            with open(self.root / "metrics.csv", "a", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows(safe_row(r) for r in self._rows)
            self._rows.clear()

    def event(self, kind: str, **fields: Any) -> None:
        if self.active and self.started:
            with open(self.root / "events.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"time": now(), "event": kind, **fields}, default=str) + "\n")

    def log_line(self, level: str, message: str) -> None:
        if not self.active:
            return
        line = f"{now()} {level:<7} {message}\n"
        if not self.started:
            self._pending.append(line)
            return
        with open(self.root / "log.txt", "a", encoding="utf-8") as fh:
            fh.write(line)

    def finish(self, status: str, exit_code: int, **extra: Any) -> None:
        if not self.active or not self.started:  # failed before anything was written: leave nothing
            return
        self.flush()
        self.info.update(status=status, exit_code=exit_code, ended=now(), **extra)
        self.save_info()
        self.event("end", status=status, exit_code=exit_code)
        try:
            plot_curves(self.root)
        except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
            self.log_line("warning", f"curves.png not written: {exc}")


class RunReporter:
    """A Reporter that forwards to the console reporter and copies log lines into log.txt."""

    def __init__(self, inner: Reporter | None, run: RunFolder, active: bool = True) -> None:
        self.inner: Reporter = inner if (inner is not None and active) else NullReporter()
        self.run = run

    def log(self, message: str, level: str = "info") -> None:
        self.run.log_line(level, message)
        self.inner.log(message, level)

    def start(self, task: str, total: int | None) -> None:
        self.inner.start(task, total)

    def advance(self, task: str, n: int = 1, **fields: object) -> None:
        self.inner.advance(task, n, **fields)

    def finish(self, task: str) -> None:
        self.inner.finish(task)


def plot_curves(root: Path) -> Path | None:
    """curves.png from metrics.csv: the training loss parts and the validation Dice against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    path = root / "metrics.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    if df.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    train = df[(df["split"] == "train") & (df["metric"] != "lr")]
    for name, g in train.groupby("metric"):
        axes[0].plot(g["step"], g["value"], label=str(name))
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses")
    if not train.empty:
        axes[0].legend(fontsize=8)
    val = df[df["split"] == "val"]
    for name, g in val.groupby("metric"):
        axes[1].plot(g["step"], g["value"], marker="o", label=str(name))
    axes[1].set_xlabel("step")
    axes[1].set_title("validation (per 3D volume)")
    if not val.empty:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    out = root / "curves.png"
    try:
        with atomic_path(out, ".png") as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return out
