"""run.json, the record of a training run (docs/run-format.md): the one place that reads and writes it.

`engine.runs.RunFolder` writes it while a run trains; `predict`, `evaluate`, `finetune --resume`,
`medcl runs` and the demo read it through `read_run_info`, so the format has one reader to keep current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medcl_cli.core.files import write_json_atomic

RUN_JSON = "run.json"


class RunInfoError(ValueError):
    """run.json exists but is not a JSON object (truncated, hand-edited, another tool's file)."""


def run_json_path(folder: str | Path) -> Path:
    return Path(folder) / RUN_JSON


def read_run_info(folder: str | Path) -> dict[str, Any]:
    """The run.json of a run folder as a dict.

    Raises FileNotFoundError when the folder has none and RunInfoError when it is not a JSON object;
    callers decide whether that is fatal (resume) or shown as a damaged run (`medcl runs`).
    """
    path = run_json_path(folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunInfoError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise RunInfoError(f"{path} is not a JSON object")
    return data


def write_run_info(info: dict[str, Any], folder: str | Path) -> None:
    """Replace run.json atomically (a crash leaves the previous version, never half a file)."""
    write_json_atomic(info, run_json_path(folder))
