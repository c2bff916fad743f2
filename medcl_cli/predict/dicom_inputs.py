"""DICOM folders as `predict` inputs, read through the ingest code (the same grouping, sorting and geometry).

`data.dicom.ingest_dicom` scans the headers, groups the files into series and converts each series into
a volume in a temporary work folder. Each series becomes one `PredictInput` named after its SeriesNumber and
SeriesDescription (`series_0003_T1_post`, plus `_t<k>` for the time points of a 4D series), so an output
is traced back to its series at a glance. No path component ever reaches an output name, and a description
the PHI guard flags (a patient name or a date seen in the headers, data/meta.py) is left out. Names that
would still collide (series 3 "T1 post" of several patients) take the first 8 hex digits of the SHA-256
of their SeriesInstanceUID (`series_0003_T1_post_1a2b3c4d`); a series without number and description is
`series_<12 hex>`.

Labels are not segmented: series whose SeriesDescription matches the run's label pattern (ingest's
`--label-series`, recorded in the run's data profile; `predict --label-series` overrides it) are not even
converted, and DICOM-SEG and RTSTRUCT objects never are images. Each skipped series is returned with its
reason, for the log and the summary line.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.io import read_image
from medcl_cli.data.phi import REDACTED
from medcl_cli.predict.item import PredictInput


def uid_hash(series_uid: str, n: int) -> str:
    return hashlib.sha256(series_uid.encode()).hexdigest()[:n]


def series_name(series_uid: str, time_index: int | None, n_times: int, number: str = "", description: str = "") -> str:
    """`series_<number>_<description>` (number zero-padded to 4 digits, description reduced to letters,
    digits, `-` and `_`, at most 40 characters; the caller passes "" for one the PHI guard flags), or
    `series_<12 hex>` of the SeriesInstanceUID when both are empty; + `_t<k>` for a time point of a 4D series."""
    num = f"{int(number):04d}" if re.fullmatch(r"\d{1,9}", (number or "").strip()) else ""
    slug = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9-]+", "_", description or "")).strip("_-")[:40].strip("_-")
    parts = [p for p in (num, slug) if p]
    name = "series_" + ("_".join(parts) if parts else uid_hash(series_uid, 12))
    return f"{name}_t{time_index}" if n_times > 1 and time_index is not None else name


def unique_names(names: list[str], uids: list[str]) -> list[str]:
    """`names` made distinct: a name shared by several series takes `_<8 hex>` of each one's UID; parts of
    one series split by echo or orientation (same UID) then take `_2`, `_3`.. in plan order."""
    series_of: dict[str, set[str]] = {}
    for n, u in zip(names, uids):
        series_of.setdefault(n, set()).add(u)
    out = [f"{n}_{uid_hash(u, 8)}" if len(series_of[n]) > 1 else n for n, u in zip(names, uids)]
    used: dict[str, int] = {}
    final = []
    for n in out:
        used[n] = used.get(n, 0) + 1
        final.append(n if used[n] == 1 else f"{n}_{used[n]}")
    return final


def _given_root(files: list[Path], roots: list[Path]) -> Path | None:
    """The input path (as the user gave it) that holds a series' files."""
    first = files[0].resolve() if files else None
    for r in roots:
        rr = r.resolve()
        if first is not None and (first == rr or rr in first.parents):
            return r
    return None


def _source_paths(files: list[str]) -> list[Path]:
    """Real file paths of a series (zip members `archive.zip!member` hash as their archive)."""
    return sorted({Path(f.split("!", 1)[0]) for f in files})


LABEL_OBJECTS = {"SEG": "a DICOM-SEG object", "RTSTRUCT": "an RTSTRUCT object"}  # labels, never images


def skip_reason(status: str, modality: str, label_series: str | None) -> str:
    """Why a report row of a series is not segmented ("" when it is not one that predict skips)."""
    if status == "ignored:label-series":
        return f"the run's label series (--label-series {label_series})"
    if status in ("ignored:seg", "ignored:non-image") and modality.upper() in LABEL_OBJECTS:
        return f"{LABEL_OBJECTS[modality.upper()]} (a label, not an image)"
    return ""


def skipped_text(series_number: str, description: str, reason: str) -> str:
    """`series 5377 'Mask_Tumor': <reason>` (the parts that are known)."""
    what = " ".join(p for p in (f"series {series_number}" if series_number else "series",
                                f"'{description}'" if description else "") if p)
    return f"{what}: {reason}"


def dicom_inputs(
    roots: list[Path], workdir: Path, reporter: Reporter | None = None, label_series: str | None = None,
    skipped: list[str] | None = None,
) -> tuple[list[PredictInput], list[tuple[str, str]]]:
    """One input per image series found under `roots`, plus (source, reason) for what failed. The series
    `label_series` matches (a regex on SeriesDescription) and SEG/RTSTRUCT objects are left out, each
    appended to `skipped` as `series N 'description': reason` and logged."""
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
    redact = Redactor()  # filled with the PHI of every header read
    cases, rows, _ = ingest_dicom(
        walked.dicom, IngestConfig(), (), label_series or None, workdir, new_case_id, lambda s: s, redact, rep,
        skip_labels=True,
    )
    for row in rows:
        why = skip_reason(row.status, row.modality, label_series)
        if why:
            desc = "" if REDACTED in row.description else redact.keep(row.description)  # no half-redacted text
            text = skipped_text(row.series_number, desc, why)
            rep.log(f"skipped {text}")
            if skipped is not None:
                skipped.append(text)
        elif row.status.startswith("failed") and not row.case_id:
            failed.append((row.source, row.reason or row.status))
        elif row.status.startswith("ignored") and row.kind != "dicom-file":
            rep.log(f"{row.source}: {row.reason or row.status}", "debug")
    inputs: list[PredictInput] = []
    descriptions = [redact.keep(c.plan.description) for c in cases]  # "" where the PHI guard flags it
    names = unique_names(
        [series_name(c.plan.series, c.plan.time_index, c.plan.n_times, c.plan.series_number, d)
         for c, d in zip(cases, descriptions)],
        [c.plan.series for c in cases])
    for case, name, desc in zip(cases, names, descriptions):
        plan = case.plan
        path = case.image
        flags = list(case.conv.flags) if case.conv is not None else []
        files = _source_paths(plan.files)
        root = _given_root(files, roots)
        inputs.append(
            PredictInput(
                name=name,
                kind="dicom",
                files=files,
                load=functools.partial(read_image, path),
                display=name,
                info={"series_flags": flags, "modality": plan.modality, "series_number": plan.series_number,
                      "series_description": desc},
                frames=[(f.source, f.index) for f in plan.frames],
                study=plan.study,
                description=plan.description,
                given=redact.scrub(str(root)) if root is not None else "",  # no patient name or date
                pseudonym="series_" + uid_hash(plan.series, 12),
            )
        )
    return inputs, failed
