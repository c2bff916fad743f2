"""`medcl demo`: the built-in DICOM export (headers, geometry, PHI, meta signal) and the whole pipeline.

The default-suite test runs `medcl demo --small` end to end (seconds); the full-size demo, with its
3-minute budget and a quality floor, is marked slow.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medcl_cli.cli.app import main
from medcl_cli.demo.dicom_writer import write_demo_dicom
from medcl_cli.data.folder import open_dataset
from medcl_cli.demo.chain import SIZES, ingest_command

PHI_VALUES = ("Demo^Patient", "DEMO00", "Demo General Hospital", "Doe^Jane")


def medcl(*args: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return int(exc.value.code or 0)



def test_demo_dicom_headers_geometry_and_meta_signal(tmp_path: Path) -> None:
    demo = write_demo_dicom(tmp_path / "dicom", n_patients=2, labelled=1, n_slices=6, size=32, seed=3)
    assert demo.labelled_patients == ["DEMO001"] and demo.unlabelled_patients == ["DEMO002"]
    assert len(demo.series) == 2 * 2 + 2  # two phases per patient, masks for the first patient only
    first = demo.series[0]
    files = sorted(first.folder.glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    for kw in ("PatientAge", "SliceLocation", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
               "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "TriggerTime", "SliceThickness"):
        assert kw in ds, kw
    assert ds.Modality == "MR" and ds.PatientAge.endswith("Y") and ds.pixel_array.shape == (32, 32)
    # same seed -> same UIDs; ED and ES are separate studies (see the module docstring)
    again = write_demo_dicom(tmp_path / "again", n_patients=2, labelled=1, n_slices=6, size=32, seed=3)
    assert pydicom.dcmread(sorted(again.series[0].folder.glob("*.dcm"))[0]).SeriesInstanceUID == ds.SeriesInstanceUID
    studies = {pydicom.dcmread(next(s.folder.glob("*.dcm"))).StudyInstanceUID for s in demo.series[:4]}
    assert len(studies) == 2
    # meta labels carry signal: the LV (label 3) is larger at ED than ES and at the base than the apex
    masks = {s.phase: s.image for s in demo.series if s.kind == "mask"}
    lv = {ph: (m == 3).sum(axis=(1, 2)) for ph, m in masks.items()}
    assert lv["ED"].sum() > lv["ES"].sum() and lv["ED"][0] > lv["ED"][-1]

    # ingest it: exact voxels and geometry, labels from the mask series, PHI nowhere in the dataset
    from medcl_cli.data.ingest import IngestRequest, ingest

    req = IngestRequest(inputs=[tmp_path / "dicom"], out=tmp_path / "data", label_series="Mask",
                        meta=["PatientAge", "SliceLocation", "TriggerTime"])
    res = ingest(req)
    assert res.cases == 4 and res.labelled == 2 and res.failed == 0
    data = open_dataset(tmp_path / "data")
    row = data.cases[data.cases["label"] != ""].iloc[0]
    img = sitk.ReadImage(str(data.root / row["image"]))
    arr = sitk.GetArrayFromImage(img)
    written = [s for s in demo.series if s.kind == "image" and s.patient_id == "DEMO001"]
    match = [s for s in written if s.image.shape == arr.shape and np.array_equal(s.image, arr)]
    assert len(match) == 1, "ingested voxels differ from the generated series"
    s = match[0]
    assert np.allclose(img.GetOrigin(), s.origin, atol=1e-3)
    assert np.allclose(img.GetSpacing(), s.spacing, atol=1e-3)
    d = np.array(img.GetDirection()).reshape(3, 3)
    assert np.allclose(d[:, 0], s.row_cosine, atol=1e-5) and np.allclose(d[:, 1], s.col_cosine, atol=1e-5)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(data.root / row["label"])))
    mask = next(m for m in demo.series if m.kind == "mask" and m.phase == s.phase and m.patient_id == "DEMO001")
    assert np.array_equal(lab, mask.image)
    assert {"TriggerTime", "PatientAge_years", "SliceLocation"} <= set(data.meta.columns)
    assert data.meta["TriggerTime"].nunique() == 2
    phi = (*PHI_VALUES, str(ds.AccessionNumber), str(ds.PatientBirthDate), str(ds.StudyInstanceUID))
    for p in data.root.rglob("*"):
        if p.is_file() and p.suffix in (".csv", ".json"):
            text = p.read_text()
            assert not any(v in text for v in phi), f"PHI in {p.name}"


def test_demo_small_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert medcl("demo", "--out", str(out), "--small") == 0
    cap = capsys.readouterr()
    printed = [ln.split("$ medcl ", 1)[1] for ln in cap.out.splitlines() if "$ medcl " in ln]
    assert [shlex.split(p)[0] for p in printed] == ["ingest", "pretrain", "finetune", "evaluate", "predict"]
    assert shlex.split(printed[0]) == ingest_command(out, SIZES["small"])
    # what each run folder recorded as its command is exactly what was printed
    for name, idx in (("gcl", 1), ("ft", 2)):
        info = json.loads((out / "runs" / name / "run.json").read_text())
        assert info["command"] == ["medcl", *shlex.split(printed[idx])]
        assert info["status"] == "completed"
    assert json.loads((out / "runs" / "gcl" / "run.json").read_text())["method"] == "gcl"
    ft = json.loads((out / "runs" / "ft" / "run.json").read_text())
    assert ft["init_from"] and len(ft["labeled_patients"]) == SIZES["small"].labeled
    assert "results on the test split" in cap.out and "mean_foreground" in cap.out
    assert len(list((out / "runs" / "ft" / "eval_test" / "overlays").glob("*.png"))) >= 1
    assert (out / "runs" / "ft" / "eval_test" / "report.html").is_file() and "report.html" in cap.out
    preds = sorted((out / "preds").glob("*.nii.gz"))
    assert len(preds) == 2  # the new patient's ED and ES series
    pred = sitk.ReadImage(str(preds[0]))
    assert pred.GetSize() == (32, 32, pred.GetSize()[2]) and set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}
    # the demo's runs show up in `medcl runs`; a second demo into the same folder is refused (exit 6)
    assert medcl("runs", str(out / "runs"), "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["method"] for r in listed) == ["gcl", "supervised"]
    assert medcl("demo", "--out", str(out), "--small") == 6
    # the DICOM headers carry PHI-shaped values; nothing medcl wrote outside the inputs may hold them
    for p in out.rglob("*"):
        if p.is_file() and p.parts[len(out.parts)] not in ("dicom", "new_scans") and p.suffix in (
            ".csv", ".json", ".jsonl", ".yaml", ".txt"
        ):
            text = p.read_text(encoding="utf-8")
            assert not any(v in text for v in PHI_VALUES), f"PHI in {p.relative_to(out)}"


@pytest.mark.slow
def test_demo_full_size_within_budget(tmp_path: Path, capsys) -> None:
    """The README's main job: default size, at most 3 minutes on 2 cores, and a network that learned."""
    t0 = time.perf_counter()
    assert medcl("demo", "--out", str(tmp_path / "demo")) == 0
    seconds = time.perf_counter() - t0
    summary = json.loads((tmp_path / "demo" / "runs" / "ft" / "eval_test" / "summary.json").read_text())
    dice = summary["metrics"]["mean_foreground"]["dice"]["mean"]
    assert dice > 0.6, dice
    assert seconds < 180, seconds


def test_getting_started_shows_the_demo_commands_it_runs() -> None:
    """docs/getting-started.md quotes the demo's command lines; they must be the ones the demo plans."""
    from medcl_cli.demo.chain import training_commands

    doc = (Path(__file__).resolve().parents[1] / "docs" / "getting-started.md").read_text(encoding="utf-8")
    quoted = [shlex.split(ln.split("$ medcl ", 1)[1]) for ln in doc.splitlines() if "] $ medcl " in ln]
    size, out = SIZES["default"], Path("demo")
    planned = [ingest_command(out, size), *training_commands(out, size, size.labeled, out / "new_scans" / "DEMO009")]
    assert quoted == planned
