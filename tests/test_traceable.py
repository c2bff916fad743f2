"""Traceable names without PHI, on the real data: cases.csv carries modality, series number and description;
mask classes take the mask series' name (through training, evaluation and prediction); DICOM predictions
are named after their series number and description, NIfTI ones after their file; the sidecar records the
input path as given; the val split is reported in patients as well as cases."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import volumes as V

TINY = ["--steps", "2", "--image-size", "32", "--batch-size", "4", "--device", "cpu",
        "--set", "model.channels=[4,8,16]", "--set", "train.val_every=2"]


@pytest.fixture(scope="module")
def brain(shared_data, tmp_path_factory):
    """TCIA PGBM-003 and PGBM-008 (one study each: T1post, FLAIR_reg, Mask_Tumor), ingested and fine-tuned."""
    from medcl_cli.cli.app import main

    src = shared_data("tcia_brain_tumor_progression_dicom")
    root = tmp_path_factory.mktemp("trace")
    ds, run = root / "ds", root / "run"
    logs = {}
    for name, args in (("ingest", ["ingest", str(src / "PGBM-003"), str(src / "PGBM-008"), "--out", str(ds),
                                   "--label-series", "Mask", "--val-fraction", "0.5"]),
                       ("finetune", ["finetune", "--data", str(ds), "--out", str(run), *TINY])):
        import contextlib
        import io

        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            try:
                main(args)
            except SystemExit as exc:
                assert not exc.code, e.getvalue()
        logs[name] = (o.getvalue(), e.getvalue())
    return src, ds, run, logs


def test_cases_csv_names_each_series_and_the_mask_names_the_class(brain):
    _, ds, _, logs = brain
    cases = pd.read_csv(ds / "cases.csv", dtype=str, keep_default_na=False)
    assert set(zip(cases["modality"], cases["series_number"], cases["series_description"])) == {
        ("MR", "11", "T1post"), ("MR", "13", "T1post"), ("MR", "36468", "FLAIR_reg"), ("MR", "36537", "FLAIR_reg")}
    info = json.loads((ds / "dataset.json").read_text())
    assert info["labels"] == {"0": "background", "1": "Mask_Tumor"}  # not class_1
    assert info["split_patients"] == {"train": 1, "val": 1, "test": 0}
    assert "train 2 (1 patient), val 2 (1 patient)" in logs["ingest"][0]


def test_split_in_patients_and_class_names_through_training_and_evaluation(brain, tmp_path, capsys):
    _, ds, run, logs = brain
    info = json.loads((run / "run.json").read_text())
    assert info["dataset"]["splits"] == {"train": {"cases": 2, "patients": 1}, "val": {"cases": 2, "patients": 1}}
    assert "splits: train 2 cases (1 patient), val 2 cases (1 patient)" in logs["finetune"][1]
    code, _, err = V.run_cli(capsys, "evaluate", str(run), "--data", str(ds), "--split", "val", "--out", str(tmp_path / "ev"))
    assert code == 0, err
    per_case = pd.read_csv(tmp_path / "ev" / "metrics_per_case.csv")
    assert set(per_case["label"]) == {"Mask_Tumor"}


def test_dicom_predictions_named_after_series_number_and_description(brain, tmp_path, capsys):
    """PGBM-001 has two studies: series 11 `T1post` is in both (told apart by a UID hash), the registered
    FLAIR and T2 series have their own numbers. The mask series are the run's label series (ingest's
    `--label-series Mask`, recorded in dataset.json and the run's data profile): skipped and named, unless
    `--label-series ''`. The patient folder (its name is the PatientName) and the study date never reach a
    name; the sidecar records the folder as given, scrubbed."""
    src, ds, run, _ = brain
    assert json.loads((ds / "dataset.json").read_text())["label_series"] == "Mask"
    assert json.loads((run / "run.json").read_text())["data_profile"]["label_series"] == "Mask"
    out = tmp_path / "p"
    code, stdout, err = V.run_cli(capsys, "predict", str(run), str(src / "PGBM-001"), "--out", str(out))
    assert code == 0, err
    assert "6 written, 0 already present, 2 label series skipped, 0 failed" in stdout
    for number in (5364, 5388):
        assert f"skipped series {number} 'Mask_Tumor': the run's label series (--label-series Mask)" in err
    names = sorted(p.name[: -len(".json")] for p in out.glob("*.json"))
    assert len(names) == 6 and sorted(p.name for p in out.glob("*.nii.gz")) == [f"{n}.nii.gz" for n in names]
    t1 = [n for n in names if n.startswith("series_0011_T1post_")]
    assert len(t1) == 2 and all(re.fullmatch(r"series_0011_T1post_[0-9a-f]{8}", n) for n in t1)
    assert set(names) - set(t1) == {"series_35637_FLAIR_reg", "series_35623_FLAIR_reg", "series_37910_T2_reg",
                                    "series_37908_T2_reg"}
    masks = [p for p in (src / "PGBM-001").glob("*/*") if "Mask" in p.name]  # mask series folders, as a user gives them
    code, _, err = V.run_cli(capsys, "predict", str(run), *map(str, masks), "--out", str(tmp_path / "m"))
    assert code == 4 and "nothing to segment" in err, err
    code, stdout, err = V.run_cli(capsys, "predict", str(run), *map(str, masks), "--out", str(tmp_path / "m"),
                                  "--label-series", "")
    assert code == 0 and "2 written" in stdout, err
    assert sorted(p.name for p in (tmp_path / "m").glob("*.json")) == ["series_5364_Mask_Tumor.json",
                                                                     "series_5388_Mask_Tumor.json"]
    for n in names:
        side = json.loads((out / f"{n}.json").read_text())
        assert side["input"] == str(src / "<redacted>")  # PGBM-001 is the PatientName
        assert side["label_map"] == {"0": "background", "1": "Mask_Tumor"}
        assert side["series_description"] in n and side["series_number"] in n
    assert "PGBM" not in stdout + " ".join(names)


def test_dicom_names_keep_phi_out_and_stay_unique(tmp_path, capsys):
    """A description holding the patient name or a date is left out of the name (and of cases.csv); two series
    with the same number and description (two patients) stay apart."""
    import dicomgen as g

    src = tmp_path / "src"
    for i, desc in enumerate(("T1 post", "T1 post", "T2 Doe", "FLAIR 2019-03-04")):
        g.write_series(src / f"s{i}", g.volume(4, 16, 16, seed=i), description=desc, phi={"PatientID": f"P{i}"})
    run = V.write_run(tmp_path / "run")
    out = tmp_path / "p"
    code, _, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(out))
    assert code == 0, err
    names = sorted(p.name[: -len(".json")] for p in out.glob("*.json"))
    assert len(names) == 4 and len([n for n in names if re.fullmatch(r"series_0003_T1_post_[0-9a-f]{8}", n)]) == 2
    assert len([n for n in names if n == "series_0003" or re.fullmatch(r"series_0003_[0-9a-f]{8}", n)]) == 2
    assert not any("Doe" in n or "2019" in n for n in names)
    code, _, err = V.run_cli(capsys, "ingest", str(src), "--out", str(tmp_path / "ds"))
    assert code == 0, err
    cases = pd.read_csv(tmp_path / "ds" / "cases.csv", dtype=str, keep_default_na=False)
    assert sorted(cases["series_description"]) == ["", "", "T1 post", "T1 post"]


def test_nifti_predictions_named_after_the_file_with_the_path_as_given(shared_data, tmp_path, capsys, monkeypatch):
    """ACDC: the output is named after the input file (nnU-Net's `_0000` dropped, as nnU-Net names its
    predictions), the sidecar holds the path as typed; two inputs with one stem in different folders
    (acdc/images and acdc/labels) are refused, naming both paths."""
    acdc = shared_data("acdc")
    run = V.write_run(tmp_path / "run")
    shutil.copy(acdc / "images" / "patient002_frame01.nii.gz", tmp_path / "patient002_0000.nii.gz")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p"
    given = "patient002_0000.nii.gz"  # relative, as typed
    code, _, err = V.run_cli(capsys, "predict", str(run), given, str(acdc / "images" / "patient003_frame01.nii.gz"),
                             "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["patient002.nii.gz", "patient003_frame01.nii.gz"]
    assert json.loads((out / "patient002.json").read_text())["input"] == given
    assert json.loads((out / "patient003_frame01.json").read_text())["input"] == str(
        acdc / "images" / "patient003_frame01.nii.gz")
    a, b = acdc / "images" / "patient002_frame01.nii.gz", acdc / "labels" / "patient002_frame01.nii.gz"
    code, _, err = V.run_cli(capsys, "predict", str(run), str(a), str(b), "--out", str(tmp_path / "q"))
    assert code == 2 and str(a) in err and str(b) in err
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())
    # an nnU-Net raw folder: imagesTr/case_0000 beside labelsTr/case keeps its _0000 rather than colliding
    raw = tmp_path / "raw"
    for sub, name in (("imagesTr", "case_0000.nii.gz"), ("labelsTr", "case.nii.gz")):
        (raw / sub).mkdir(parents=True)
        shutil.copy(acdc / "images" / "patient002_frame01.nii.gz", raw / sub / name)
    code, _, err = V.run_cli(capsys, "predict", str(run), str(raw), "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "r").glob("*.nii.gz")) == ["case.nii.gz", "case_0000.nii.gz"]


def test_4d_enhanced_series_named_per_time_point(shared_data, tmp_path, capsys):
    """dcm_qa XA10: one enhanced multi-frame series (number 6, `REST1 w SMS PF7-8`) of 4 time points."""
    run = V.write_run(tmp_path / "run")
    src = shared_data("dcm_qa_enh_multiframe") / "In" / "Siemens" / "XA10"
    code, _, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "p").glob("*.nii.gz")) == [
        f"series_0006_REST1_w_SMS_PF7-8_t{k}.nii.gz" for k in range(4)]
