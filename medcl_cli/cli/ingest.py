"""`medcl ingest`: DICOM folders/zips and NIfTI/NRRD/MHA files -> a dataset folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medcl_cli.cli import console
from medcl_cli.cli.options import ConfigOpt, JsonOpt, OverwriteOpt, SeedOpt, SetOpt


def _label_names(text: str | None) -> dict[int, str]:
    from medcl_cli.errors import UsageError

    out: dict[int, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise UsageError(f"--label-names: cannot parse '{item}'", "use VALUE=NAME pairs, e.g. 1=RV,2=Myo,3=LV")
        out[int(value)] = name.strip()
    return out


def ingest(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM folders (recursive, any names), zip archives, "
                                                      "NIfTI/NRRD/MHA files or folders of them; mixed is fine.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to create.")],
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Folder of NIfTI labels matched by case name "
                                                                     "(nnU-Net _0000 suffix tolerated).")] = None,
    label_series: Annotated[Optional[str], typer.Option(
        "--label-series", help="Regex on SeriesDescription: such DICOM series are masks and label every image "
                               "series of their study on the same grid (e.g. Mask).")] = None,
    label_names: Annotated[Optional[str], typer.Option("--label-names", help="Class names, e.g. 1=RV,2=Myo,3=LV.")] = None,
    channels: Annotated[Optional[str], typer.Option(
        "--channels", help="Multi-sequence cases, e.g. T1post,FLAIR,T2: one case per DICOM study (series matched on "
                           "SeriesDescription, case-insensitive) or per NIfTI case (<case>_0000.., <case>_<name>, "
                           "or <case>/<name>), one channel per name, on the first channel's grid.")] = None,
    frames: Annotated[Optional[str], typer.Option(
        "--frames", help="4D NIfTI/NRRD/MHA volumes (cine, DWI): 'split' makes one case per frame (<case>_f00, "
                         "<case>_f01, ..., one patient, so never in two splits), N keeps frame N only (0-based). "
                         "Without it a 4D volume is refused (failed:4d). DICOM 4D series are always split.")] = None,
    meta: Annotated[Optional[str], typer.Option("--meta", help="DICOM keywords for meta.csv, e.g. "
                                                               "PatientAge,SliceLocation.")] = None,
    meta_csv: Annotated[Optional[Path], typer.Option("--meta-csv", help="CSV with case_id + per-case columns "
                                                                        "to join (a 'patient' column sets the patient).")] = None,
    split_file: Annotated[Optional[Path], typer.Option("--split-file", help="CSV case_id,split (train|val|test).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Patients in val (default 0.2).")] = None,
    test_fraction: Annotated[Optional[float], typer.Option("--test-fraction", help="Patients in test (default 0).")] = None,
    seed: SeedOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes (default: one per core).")] = None,
    allow_phi: Annotated[bool, typer.Option("--allow-phi", help="Allow PHI keywords in --meta; their values and an "
                                                                "id map go to DATASET/private/ only.")] = False,
    allow_phi_tags: Annotated[Optional[str], typer.Option(
        "--allow-phi-tags", help="Free-text --meta tags to write to meta.csv anyway (e.g. SeriesDescription,"
                                 "ImageComments); each value is scrubbed of the patient's name, IDs, birth date, "
                                 "accession number and institution (docs/phi.md).")] = None,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn DICOM or NIfTI inputs into a dataset folder (images/, labels/, cases.csv, meta.csv, dataset.json,
    ingest_report.csv) ready for pretrain/finetune.

    DICOM series are grouped, sorted by position along the slice normal, checked (gaps, duplicates, tilt,
    variable spacing), 4D series are split per time point, and each volume is written as NIfTI with its exact
    geometry. PHI never enters the dataset unless --allow-phi (then only under private/); free-text tags
    (descriptions, comments) need --allow-phi-tags and are scrubbed (docs/phi.md). Ages over 89 read 90+.
    NaN/inf voxels are replaced by the volume's minimum finite value (noted in ingest_report.csv).
    Exit codes: 0 every input became a case, 5 some were skipped (see ingest_report.csv), 3 nothing usable
    (the reason is printed and ingest_report.csv still written), 4 nothing usable because every input was a
    4D volume without --frames, 2 bad option (unknown or PHI --meta keyword), 6 --out not empty, being
    written by another ingest, or not writable.

    Example: medcl ingest ./dicoms --out data/ --meta PatientAge,SliceLocation --label-series Mask
    Multi-sequence: medcl ingest ./brain --out brain/ --channels T1post,FLAIR,T2 --label-series Mask
    Cine NIfTI: medcl ingest ./acdc/patient001_4d.nii.gz --out cine/ --frames split
    """
    from medcl_cli.config import load_config, with_overrides
    from medcl_cli.data.channels import parse_channels
    from medcl_cli.data.ingest import IngestRequest, ingest as run_ingest
    from medcl_cli.data.volume_frames import parse_frames
    from medcl_cli.errors import PartialSuccess

    cfg = with_overrides(load_config(list(config or []), sets), {
        "ingest.val_fraction": val_fraction, "ingest.test_fraction": test_fraction, "ingest.seed": seed,
        "ingest.workers": workers,
    })
    req = IngestRequest(
        inputs=list(inputs), out=out, labels_dir=labels, label_series=label_series,
        label_names=_label_names(label_names), meta=[m for m in (meta or "").split(",") if m.strip()],
        meta_csv=meta_csv, split_file=split_file, allow_phi=allow_phi, overwrite=overwrite,
        allow_phi_tags=[t for t in (allow_phi_tags or "").split(",") if t.strip()],
        channels=parse_channels(channels), frames=parse_frames(frames), cfg=cfg.ingest,
    )
    res = run_ingest(req, console.ConsoleReporter())
    skipped = {k: v for k, v in res.reasons.items() if not k.startswith(("ok", "label"))}
    if as_json:
        console.result(json.dumps({"dataset": str(res.out), "cases": res.cases, "labelled": res.labelled,
                                   "splits": res.splits, "split_patients": res.split_patients, "failed": res.failed, "ignored": res.ignored,
                                   "reasons": skipped, "missing_meta": res.missing_meta}, indent=2))
    else:
        console.result(str(res.out))
        splits = ", ".join(f"{k} {v} ({res.split_patients.get(k, 0)} patient{'' if res.split_patients.get(k) == 1 else 's'})"
                           for k, v in res.splits.items() if v)
        console.result(f"cases: {res.cases} ({res.labelled} labelled; {splits})")
        console.result(f"skipped: {res.failed} failed, {res.ignored} ignored"
                       + (f" ({', '.join(f'{k} x{v}' for k, v in sorted(skipped.items()))})" if skipped else ""))
        missing = {k: v for k, v in res.missing_meta.items() if v}
        if missing:
            console.result("missing meta values (slices): " + ", ".join(f"{k} {v}" for k, v in missing.items()))
        console.result(f"next: medcl finetune --data {res.out} --out runs/finetune")
    if res.partial:
        raise PartialSuccess(
            f"{res.failed} input(s) could not become cases; the dataset holds the other {res.cases}",
            f"see {res.out / 'ingest_report.csv'} for each file's status and reason",
        )
