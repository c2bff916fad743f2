"""DICOMDIR: a media export (pydicom FileSet: PT*/ST*/SE*/IM* files without extensions plus the index)
written over two real TCIA series; the series it references are ingested, a series it does not reference is
still found, the DICOMDIR alone as the input brings its files, and missing referenced files are reported
(one row each), not fatal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.fileset import FileSet

from medcl_cli.config import IngestConfig
from medcl_cli.data.ingest import IngestRequest, ingest

STUDY = "tcia_brain_tumor_progression_dicom/PGBM-008/06-10-1993-FH-HEADBrain Protocols-26857"
CFG = IngestConfig(workers=1)


@pytest.fixture
def media(shared_data, tmp_path):
    """(export root, {SeriesNumber: [referenced files]}) with T1post and FLAIRreg in the DICOMDIR and the
    tumour mask series copied beside it, unreferenced."""
    study = shared_data(STUDY)
    fs = FileSet()
    for sub in ("13-T1post-21069", "36537-FLAIRreg-18447"):
        for f in sorted((study / sub).glob("*.dcm")):
            ds = pydicom.dcmread(f)
            ds.StudyID = ds.get("StudyID") or "1"  # empty in the anonymised TCIA export; a STUDY record needs it
            fs.add(ds)
    root = tmp_path / "media"
    fs.write(root)
    shutil.copytree(study / "5355-MaskTumor-76568", root / "loose")
    files: dict[str, list[Path]] = {}
    for inst in fs:
        files.setdefault(str(inst.SeriesNumber), []).append(root.joinpath(*inst.ReferencedFileID))
    return root, files


def _run(tmp: Path, inputs: list[Path]) -> tuple[object, pd.DataFrame, pd.DataFrame]:
    res = ingest(IngestRequest(inputs=inputs, out=tmp / "ds", cfg=CFG, overwrite=True))
    report = pd.read_csv(tmp / "ds" / "ingest_report.csv", dtype=str, keep_default_na=False)
    cases = pd.read_csv(tmp / "ds" / "cases.csv", keep_default_na=False)
    return res, report, cases


def test_referenced_and_unreferenced_series_are_ingested(media, tmp_path):
    root, files = media
    assert (root / "DICOMDIR").exists() and not any(p.suffix for p in root.rglob("IM*"))
    res, report, _ = _run(tmp_path, [root])
    assert res.cases == 3 and not res.partial  # T1post, FLAIRreg (referenced), mask (loose)
    ok = report[report["status"] == "ok"]
    assert sorted(ok["files"].astype(int)) == sorted([len(v) for v in files.values()] + [22])
    row = report[report["status"] == "ignored:dicomdir"].iloc[0]
    assert f"index of {sum(len(v) for v in files.values())} file(s)" in row["reason"]


def test_dicomdir_alone_brings_its_files(media, tmp_path):
    root, _ = media
    res, _, _ = _run(tmp_path, [root / "DICOMDIR"])
    assert res.cases == 2 and not res.partial  # only what the index references: the loose series is not reached


def test_missing_referenced_files_are_reported_not_fatal(media, tmp_path):
    root, files = media
    gone = sorted(files["13"])[:3]  # InstanceNumber order is not position order: gaps may or may not appear
    flair = files[next(k for k in files if k != "13")]
    for f in gone:
        f.unlink()
    res, report, _ = _run(tmp_path, [root])
    missing = report[report["status"] == "failed:missing"]
    assert len(missing) == 3 and all("referenced by the DICOMDIR" in r for r in missing["reason"])
    assert res.partial and res.cases >= 2  # FLAIRreg and the loose mask series at least
    assert "3 referenced file(s) missing" in report[report["status"] == "ignored:dicomdir"].iloc[0]["reason"]
    assert (report["files"].astype(int) == len(flair)).any()


def test_lower_case_copy_of_the_media_still_matches(media, tmp_path):
    root, _ = media
    for p in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if p.name != "DICOMDIR" and p.name != p.name.lower() and "loose" not in p.parts:
            p.rename(p.with_name(p.name.lower()))
    res, report, _ = _run(tmp_path, [root / "DICOMDIR"])
    assert res.cases == 2 and (report["status"] != "failed:missing").all()


def test_unreadable_dicomdir_is_reported_and_the_folder_still_read(media, tmp_path):
    root, _ = media
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    res, report, _ = _run(tmp_path, [root])
    assert res.cases == 3
    row = report[report["source"].str.endswith("DICOMDIR")].iloc[0]
    assert row["status"] in ("failed:corrupt", "ignored:dicomdir")
