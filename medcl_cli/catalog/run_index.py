"""The list of runs under a folder: every directory holding a `run.json` (core/runfolder.py), recursively.

`medcl runs` answers "what did I train, on what, and how good was it" without opening any checkpoint:
each row comes from run.json (method, stage, dataset, labelled patients, best validation Dice, duration,
status) plus the `summary.json` of any `eval_<split>/` folder `medcl evaluate` wrote inside the run.
A run.json that cannot be parsed still gets a row (status `unreadable`), so a broken run is visible
rather than silently missing.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medcl_cli.core.runfolder import read_run_info
from medcl_cli.errors import InputNotFoundError

OVERALL = "mean_foreground"  # the summary.json label of the per-case mean over foreground classes (evaluate/metrics.py)


@dataclass
class RunRow:
    """One run as `medcl runs` shows it (None = unknown)."""

    path: str  # the run folder, relative to the folder searched
    stage: str | None = None
    method: str | None = None
    dataset: str | None = None
    labeled: int | None = None  # labelled patients the run used
    best_dice: float | None = None  # best validation Dice (per 3D volume) during training
    best_step: int | None = None
    eval_dice: dict[str, float | None] = field(default_factory=dict)  # split -> mean foreground Dice
    steps: int | None = None
    duration_s: float | None = None
    status: str = "unknown"
    started: str | None = None
    error: str | None = None


def _duration(info: dict[str, Any]) -> float | None:
    total = (info.get("timings") or {}).get("total_s")
    if isinstance(total, (int, float)):
        return float(total)
    try:
        start = _dt.datetime.fromisoformat(str(info["started"]))
        end = _dt.datetime.fromisoformat(str(info["ended"]))
    except (KeyError, ValueError, TypeError):
        return None
    return (end - start).total_seconds()


def _eval_dice(run_dir: Path) -> dict[str, float | None]:
    """Mean foreground Dice of each `eval_<split>/summary.json` inside the run."""
    out: dict[str, float | None] = {}
    for summary in sorted(run_dir.glob("eval_*/summary.json")):
        split = summary.parent.name.removeprefix("eval_")
        try:
            js = json.loads(summary.read_text(encoding="utf-8"))
            value = js["metrics"][OVERALL]["dice"]["mean"]
            out[split] = None if value is None or not math.isfinite(float(value)) else float(value)
        except (OSError, ValueError, KeyError, TypeError):
            out[split] = None
    return out


def read_run(run_json: Path, root: Path) -> RunRow:
    """A row from one run.json (never raises for a damaged file: status `unreadable`)."""
    rel = str(run_json.parent.relative_to(root)) if run_json.parent != root else "."
    try:
        info = read_run_info(run_json.parent)
    except (OSError, ValueError) as exc:
        return RunRow(path=rel, status="unreadable", error=str(exc).splitlines()[0][:200])
    best = info.get("best") or {}
    dataset = info.get("dataset") or {}
    labeled = info.get("labeled_patients")
    return RunRow(
        path=rel,
        stage=info.get("stage"),
        method=info.get("method"),
        dataset=dataset.get("name") or (Path(dataset["path"]).name if dataset.get("path") else None),
        labeled=len(labeled) if isinstance(labeled, list) else None,
        best_dice=float(best["value"]) if isinstance(best.get("value"), (int, float)) else None,
        best_step=int(best["step"]) if isinstance(best.get("step"), int) else None,
        eval_dice=_eval_dice(run_json.parent),
        steps=info.get("steps_done"),
        duration_s=_duration(info),
        status=str(info.get("status") or "unknown"),
        started=info.get("started"),
        error=info.get("error"),
    )


def find_runs(root: str | Path) -> list[RunRow]:
    """Every run under `root` (the folder itself included), oldest first; hidden folders are skipped."""
    base = Path(root)
    if not base.is_dir():
        raise InputNotFoundError(f"folder not found: {base}", "give the folder that holds your run folders, e.g. runs/")
    found = [p for p in base.rglob("run.json") if not any(part.startswith(".") for part in p.relative_to(base).parts[:-1])]
    rows = [read_run(p, base) for p in found]
    rows.sort(key=lambda r: (r.started or "", r.path))
    return rows


def to_json(rows: list[RunRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table_lines(rows: list[RunRow]) -> list[str]:
    """Aligned text: one line per run (what `medcl runs` prints)."""
    head = ["run", "stage", "method", "dataset", "labelled", "best_val_dice", "eval_dice", "duration", "status"]
    body = [
        [
            r.path,
            r.stage or "-",
            r.method or "-",
            r.dataset or "-",
            "-" if r.labeled is None else str(r.labeled),
            _fmt(r.best_dice),
            " ".join(f"{k}={_fmt(v)}" for k, v in r.eval_dice.items()) or "-",
            _fmt_duration(r.duration_s),
            r.status,
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
