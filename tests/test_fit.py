"""predict/fit.py: a pretraining-only run is refused, an input far from the training data warns (--strict: exit 4)."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

import volumes as V
from medcl_cli.data.profile import image_profile
from medcl_cli.predict.fit import NotFitError, check_fit, head_trained, mismatches

# the blob scans of volumes.py are on a 0.7 x 0.9 x 3.5 mm grid
NEAR = {"modality": "MR", "n_channels": 1, "spacing_mm": {"min": [0.6, 0.8, 3.0], "max": [0.8, 1.0, 5.0]}}
FAR = {"modality": "MR", "n_channels": 1, "spacing_mm": {"min": [1.5, 1.5, 8.0], "max": [1.9, 1.9, 10.0]}}


def _scan(folder):
    folder.mkdir(parents=True, exist_ok=True)
    img, _ = V.blob_volume((40, 36, 4), seed=5)
    sitk.WriteImage(V.oblique_image(img), str(folder / "scan.nii.gz"))
    return folder / "scan.nii.gz"


@pytest.mark.parametrize("recorded", [True, False])
def test_pretraining_only_run_is_refused_by_predict_and_evaluate(recorded, tmp_path, capsys):
    state = {**V.trained_blob_state(), "stage": "pretrain", "method": "gcl"}
    if recorded:
        state["segmentation_trained"] = False
    run = V.write_run(tmp_path / "gcl", state)
    code, _, err = V.run_cli(capsys, "predict", str(run), str(_scan(tmp_path / "in")), "--out", str(tmp_path / "out"))
    assert code == 4, err
    assert "no segmentation head trained on masks" in err and f"medcl finetune --data DATASET --init-from {run}" in err
    assert not (tmp_path / "out").exists()  # refused before anything was read or written
    ds = V.write_dataset(tmp_path / "ds", {"a": "val"})
    code, _, err = V.run_cli(capsys, "evaluate", str(run), "--data", str(ds), "--split", "val")
    assert code == 4 and "--init-from" in err, err


def test_head_trained_reads_the_record_then_falls_back_on_stage_and_method():
    assert head_trained({"segmentation_trained": True, "stage": "pretrain"}, {}) is True
    assert head_trained({}, {"segmentation_trained": False, "stage": "finetune"}) is False
    assert head_trained({"stage": "pretrain", "method": "simclr"}, {}) is False
    assert head_trained({"stage": "pretrain", "method": "arco"}, {}) is True  # stage 1 has a Dice + CE term
    assert head_trained({"stage": "finetune", "method": "supervised"}, {}) is True


def test_far_spacing_warns_and_strict_refuses(tmp_path, capsys):
    scan = _scan(tmp_path / "in")
    near = V.write_run(tmp_path / "near", {**V.trained_blob_state(), "data_profile": NEAR})
    code, _, err = V.run_cli(capsys, "predict", str(near), str(scan), "--out", str(tmp_path / "o1"), "--strict")
    assert code == 0 and "far from" not in err, err
    assert "fit_warnings" not in json.loads((tmp_path / "o1" / "scan.json").read_text())
    far = V.write_run(tmp_path / "far", {**V.trained_blob_state(), "data_profile": FAR})
    code, _, err = V.run_cli(capsys, "predict", str(far), str(scan), "--out", str(tmp_path / "o2"))
    assert code == 0, err
    assert "spacing x 0.7 mm is far from the training range 1.5-1.9 mm" in err
    side = json.loads((tmp_path / "o2" / "scan.json").read_text())
    assert any("spacing y 0.9 mm" in w for w in side["fit_warnings"])
    code, _, err = V.run_cli(capsys, "predict", str(far), str(scan), "--out", str(tmp_path / "o3"), "--strict")
    assert code == 4 and "does not fit the run's training data" in err, err
    assert not (tmp_path / "o3" / "scan.nii.gz").exists()
    ds = V.write_dataset(tmp_path / "ds", {"a": "val"})
    code, _, err = V.run_cli(capsys, "evaluate", str(far), "--data", str(ds), "--split", "val", "--strict")
    assert code == 4 and "split 'val'" in err, err
    code, _, err = V.run_cli(capsys, "evaluate", str(far), "--data", str(ds), "--split", "val", "--out", str(tmp_path / "e"))
    assert code == 0 and "far from the training range" in err, err
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["fit_warnings"]


def test_modality_and_channel_mismatches_are_named():
    img = sitk.Image([8, 8, 3], sitk.sitkFloat32)
    img.SetSpacing((0.7, 0.7, 5.0))
    assert mismatches(NEAR, image_profile(img, "MR")) == []
    assert mismatches(None, image_profile(img, "CT")) == []  # an old run without a profile: no check
    assert mismatches(NEAR, image_profile(img, "CT")) == ["modality CT differs from the training data's MR"]
    assert mismatches(NEAR, image_profile(img)) == []  # a NIfTI has no modality: nothing to compare
    two = sitk.Compose([img, img])
    assert mismatches(NEAR, image_profile(two, "MR")) == ["2 channel(s) given, the run was trained on 1"]
    with pytest.raises(NotFitError) as exc:
        check_fit(NEAR, image_profile(img, "CT"), "scan.nii.gz", strict=True)
    assert exc.value.exit_code == 4


def test_dataset_profile_reads_spacing_channels_and_true_intensities(tmp_path):
    import numpy as np

    from medcl_cli.data.folder import open_dataset
    from medcl_cli.data.profile import dataset_profile

    ds = open_dataset(V.write_dataset(tmp_path / "ds", {"a": "train", "b": "train", "c": "val"}))
    prof = dataset_profile(ds)
    assert prof["modality"] == "MR" and prof["n_channels"] == 1 and prof["cases"] == 2  # the train split
    assert prof["spacing_mm"] == {"min": [0.7, 0.9, 3.5], "max": [0.7, 0.9, 3.5]}
    voxels = np.concatenate([sitk.GetArrayFromImage(sitk.ReadImage(str(ds.image_path(c)))).ravel() for c in "ab"])
    stats = prof["intensity"][0]  # small volumes: every voxel is used, so the numbers are exact
    assert stats["p50"] == pytest.approx(np.percentile(voxels, 50), abs=1e-3)
    assert stats["mean"] == pytest.approx(voxels.mean(), abs=1e-3) and stats["std"] == pytest.approx(voxels.std(), abs=1e-3)
    assert dataset_profile(ds, "val")["cases"] == 1 and "intensity" not in dataset_profile(ds, intensity=False)


def test_categorical_meta_keeps_case_categories_only():
    import numpy as np

    from medcl_cli.data.profile import categorical_meta

    case = np.repeat(np.arange(4), 3)  # 4 cases x 3 slices
    columns = {
        "phase": (["ED", "ES"], np.repeat([0, 1, 0, 1], 3)),  # a category of each case: kept
        "image_0001": ([f"images/c{i}_0001.nii.gz" for i in range(4)], np.repeat(np.arange(4), 3)),  # a file
        "PatientAge": (["41", "51", "52"], np.repeat([0, 1, 2, 1], 3)),  # a measurement
        "flags": (["gap", "tilt"], np.repeat([0, 1, 0, -1], 3)),  # bookkeeping
        "scanner": (["A", "B"], np.tile([0, 1, 0], 4)),  # varies within a case
        "site": (["X"], np.zeros(12, dtype=np.int64)),  # one value
    }
    names = list(columns)
    meta = np.stack([columns[n][1] for n in names], axis=1)
    assert categorical_meta(names, {n: columns[n][0] for n in names}, meta, case) == ("phase",)
