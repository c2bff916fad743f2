"""What `medcl predict` takes from its inputs: the run's label series, DICOM-SEG objects and NaN/inf voxels.

- A DICOM folder's label series (ingest's `--label-series`, recorded in the run's data profile) and SEG
  objects are skipped and named on stderr, `--label-series` overrides the run's pattern, and a folder of
  labels only is refused (exit 4). The real TCIA chain is in test_traceable.py.
- NaN/inf voxels of NIfTI/NRRD inputs are replaced by the volume's minimum finite value as ingest does
  (raw NIfTI values: ITK reads NaN as 0), with a warning and `nonfinite_replaced` in the sidecar; a volume
  with no finite voxel fails (exit 4 alone, 5 beside others).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import volumes as V


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The blob run, as if fine-tuned on a dataset ingested with --label-series Mask."""
    state = {**V.trained_blob_state(), "data_profile": {"modality": "MR", "n_channels": 1, "label_series": "Mask"}}
    return V.write_run(tmp_path_factory.mktemp("pi") / "run", state)


def _series(folder, seed, description, number):
    import pydicom

    img, _ = V.blob_volume((36, 32, 4), seed=seed, scale=500.0)
    files = V.write_dicom_series(V.oblique_image(img, sitk.sitkInt16), folder)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesDescription, ds.SeriesNumber = description, number
        ds.save_as(f, enforce_file_format=True)
    return files


def test_label_series_and_seg_objects_are_skipped(run, tmp_path, capsys):
    src = tmp_path / "study"
    _series(src / "t1", 90, "T1post", 3)
    _series(src / "mask", 91, "Mask_Tumor", 5377)
    code, out, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "p"), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["written"] == ["series_0003_T1post"]
    assert res["skipped_series"] == ["series 5377 'Mask_Tumor': the run's label series (--label-series Mask)"]
    assert "skipped series 5377 'Mask_Tumor': the run's label series (--label-series Mask)" in err
    code, out, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "p2"))
    assert code == 0 and "1 written, 0 already present, 1 label series skipped, 0 failed" in out, err
    # --label-series '' segments every series; another pattern replaces the run's
    code, out, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "all"), "--label-series", "",
                               "--json")
    assert code == 0 and sorted(json.loads(out)["written"]) == ["series_0003_T1post", "series_5377_Mask_Tumor"], err
    code, out, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "t1"), "--label-series",
                               "(?i)t1", "--json")
    assert code == 0 and json.loads(out)["written"] == ["series_5377_Mask_Tumor"], err
    assert "--label-series (?i)t1" in err
    # only labels: nothing to segment (4), the hint names the way out
    code, _, err = V.run_cli(capsys, "predict", str(run), str(src / "mask"), "--out", str(tmp_path / "none"))
    assert code == 4 and "nothing to segment" in err and "Mask_Tumor" in err and "--label-series ''" in err, err
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())
    code, _, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "bad"), "--label-series", "(")
    assert code == 2 and "not a valid regular expression" in err
    # an RTSTRUCT and a DICOM-SEG object beside their series are labels, never images
    import dicomgen as g
    from pydicom.uid import RTStructureSetStorage, generate_uid

    rt = g._base(RTStructureSetStorage, generate_uid(), generate_uid(), None, "RTSTRUCT")
    rt.SeriesNumber, rt.SeriesDescription = 12, "contours"
    rt.save_as(src / "t1" / "rt.dcm", enforce_file_format=True)
    code, out, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "rt"), "--json")
    assert code == 0 and "series 12 'contours': an RTSTRUCT object (a label, not an image)" in \
        json.loads(out)["skipped_series"], err
    pytest.importorskip("highdicom")
    seg_out = tmp_path / "seg"
    code, _, err = V.run_cli(capsys, "predict", str(run), str(src / "t1"), "--out", str(seg_out), "--format", "dicom-seg")
    assert code == 0, err
    shutil.copy(next(seg_out.glob("*.seg.dcm")), src / "t1" / "seg.dcm")
    code, out, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "p3"), "--json")
    res = json.loads(out)
    assert code == 0 and res["written"] == ["series_0003_T1post"], err
    assert any(s.startswith("series 900") and s.endswith("a DICOM-SEG object (a label, not an image)")
               for s in res["skipped_series"]), res


def _nonfinite_scans(folder):
    folder.mkdir(parents=True)
    arr, lab = V.blob_volume((38, 33, 4), seed=71, scale=300.0, offset=20.0)
    low = float(arr.min())
    arr[0, 0, :3] = np.nan
    arr[1, 0, 0] = np.inf
    arr[2, 0, 0] = -np.inf
    for name in ("raw.nii.gz", "raw_nrrd.nrrd"):
        sitk.WriteImage(V.oblique_image(arr), str(folder / name))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 16, 16), np.nan, np.float32)), str(folder / "allnan.nii.gz"))
    return low, lab


def test_nonfinite_voxels_are_replaced_like_ingest(run, tmp_path, capsys):
    low, lab = _nonfinite_scans(tmp_path / "in")
    out = tmp_path / "out"
    code, stdout, err = V.run_cli(capsys, "predict", str(run), str(tmp_path / "in"), "--out", str(out))
    assert code == 5, err  # two written, the all-NaN volume failed
    assert "2 written" in stdout and "1 failed" in stdout
    assert "allnan.nii.gz: every voxel is NaN or inf (1024 NaN, 0 inf)" in err and "Traceback" not in err
    for name in ("raw.nii.gz", "raw_nrrd.nrrd"):
        side = json.loads((out / f"{name.split('.')[0]}.json").read_text())
        assert side["nonfinite_replaced"] == {"nan": 3, "inf": 2, "value": pytest.approx(low)}
        assert f"{name}: replaced 3 NaN and 2 inf voxels by the minimum {low:g}" in err
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name.split('.')[0]}.nii.gz")))
        assert V.dice(mask, lab) > 0.9
    code, _, err = V.run_cli(capsys, "predict", str(run), str(tmp_path / "in" / "allnan.nii.gz"), "--out",
                             str(tmp_path / "o2"))
    assert code == 4 and "no input could be segmented" in err and "every voxel is NaN or inf" in err, err
