"""DICOM folders as `predict` inputs, read through the ingest code (the same grouping, sorting and geometry).

`data.dicom.ingest_dicom` scans the headers, groups the files into series and converts each series into
a volume in a temporary work folder. Each series becomes one `PredictInput` named pseudonymously from a
hash of its SeriesInstanceUID (`series_<hash>`, plus `_t<k>` for the time points of a 4D series), so no
patient name or path component ever reaches an output name. Mask/SEG series are not segmented.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.io import read_image
from medcl_cli.predict.item import PredictInput


def series_name(series_uid: str, time_index: int | None, n_times: int) -> str:
    """`series_<12 hex>` from the SeriesInstanceUID (+ `_t<k>` for one time point of a 4D series)."""
    name = "series_" + hashlib.sha256(series_uid.encode()).hexdigest()[:12]
    return f"{name}_t{time_index}" if n_times > 1 and time_index is not None else name


def _source_paths(files: list[str]) -> list[Path]:
    """Real file paths of a series (zip members `archive.zip!member` hash as their archive)."""
    return sorted({Path(f.split("!", 1)[0]) for f in files})


def dicom_inputs(
    roots: list[Path], workdir: Path, reporter: Reporter | None = None
) -> tuple[list[PredictInput], list[tuple[str, str]]]:
    """One input per image series found under `roots`, plus (source, reason) for what failed."""
    from medcl_cli.config import IngestConfig
    from medcl_cli.data.dicom.cases import ingest_dicom
    from medcl_cli.data.dicom.scan import walk_inputs
    from medcl_cli.data.meta import Redactor

    rep = reporter or NullReporter()
    walked = walk_inputs(roots)
    failed = [(i.source.label(), i.reason) for i in walked.issues if i.status.startswith("failed")]
    if not walked.dicom:
        return [], failed
    counter = [0]

    def new_case_id() -> str:
        counter[0] += 1
        return f"series{counter[0]:05d}"

    (workdir / "images").mkdir(parents=True, exist_ok=True)
    cases, rows, _ = ingest_dicom(
        walked.dicom, IngestConfig(), (), None, workdir, new_case_id, lambda s: s, Redactor(), rep
    )
    for row in rows:
        if row.status.startswith("failed") and not row.case_id:
            failed.append((row.source, row.reason or row.status))
        elif row.status.startswith("ignored") and row.kind != "dicom-file":
            rep.log(f"{row.source}: {row.reason or row.status}", "debug")
    inputs: list[PredictInput] = []
    used: dict[str, int] = {}
    for case in cases:
        plan = case.plan
        name = series_name(plan.series, plan.time_index, plan.n_times)
        used[name] = used.get(name, 0) + 1
        if used[name] > 1:  # a series split by echo/orientation/type: deterministic suffix in plan order
            name = f"{name}_{used[name]}"
        path = case.image
        flags = list(case.conv.flags) if case.conv is not None else []
        inputs.append(
            PredictInput(
                name=name,
                kind="dicom",
                files=_source_paths(plan.files),
                load=functools.partial(read_image, path),
                display=name,
                info={"series_flags": flags, "modality": plan.modality},
                frames=[(f.source, f.index) for f in plan.frames],
                study=plan.study,
                description=plan.description,
            )
        )
    return inputs, failed
