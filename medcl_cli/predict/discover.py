"""What `medcl predict` segments: the inputs of a run (one volume, or one file per channel), without the
label series.

The label series are the DICOM series ingest took as masks: `--label-series` is recorded in dataset.json,
reaches the run through its data profile (data/profile.py), and predict leaves such series out (also
DICOM-SEG and RTSTRUCT objects, which are never images). `predict --label-series PATTERN` overrides the
run's pattern and `--label-series ''` turns it off. When everything found is skipped, nothing is left to
segment: exit 4, naming what was skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.errors import InvalidDataError, UsageError
from medcl_cli.predict.inference import LoadedModel
from medcl_cli.predict.inputs import collect_inputs, ensure_found
from medcl_cli.predict.item import PredictInput


@dataclass
class Found:
    inputs: list[PredictInput]
    failed: list[tuple[str, str]]  # (input, reason)
    skipped: list[str] = field(default_factory=list)  # `series N 'description': reason` of each label series left out
    label_series: str | None = None  # the pattern used


def label_pattern(model: LoadedModel, override: str | None) -> str | None:
    """The label-series regex predict skips: `override` when given ("" turns skipping off), else the one the
    run's training data was ingested with (None for runs from before it was recorded, or without one)."""
    pattern = override if override is not None else str((model.profile or {}).get("label_series") or "")
    if not pattern:
        return None
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--label-series '{pattern}' is not a valid regular expression: {exc}",
                         "e.g. --label-series Mask, or --label-series '' to skip no series") from None
    return pattern


def find_inputs(model: LoadedModel, paths: list[Path], workdir: Path, reporter: Reporter | None = None,
                exclude: Path | None = None, label_series: str | None = None) -> Found:
    """The inputs to segment (see the module docstring); `label_series` overrides the run's pattern."""
    rep = reporter or NullReporter()
    pattern = label_pattern(model, label_series)
    skipped: list[str] = []
    if model.num_channels > 1:
        from medcl_cli.predict.channel_inputs import collect_channel_inputs

        found, failed = collect_channel_inputs(paths, model.channel_names, workdir, rep, exclude, pattern, skipped)
    else:
        found, failed = collect_inputs(paths, workdir, rep, exclude, pattern, skipped)
    if not found and skipped and not failed:  # with failures, those are the news (ensure_found: exit 3)
        shown = "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        raise InvalidDataError(
            f"nothing to segment: every series found is a label, not an image ({len(skipped)} skipped: {shown})",
            "give the folders of the image series; to segment the label series anyway, give --label-series ''"
            if pattern else "give the folders of the image series",
        )
    ensure_found(found, failed, paths)
    return Found(found, failed, skipped, pattern)
