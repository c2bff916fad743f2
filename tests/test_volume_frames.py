"""4D NIfTI and NaN/inf voxels at ingest (issue 19, point 5): `--frames split|N`, the `failed:4d` reason and
exit 4, the NaN/inf replacement and its report note. Inputs are generated here with SimpleITK, small."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import dicomgen as g
import numpy as np
import pytest
import SimpleITK as sitk
import volumes as V

SPACING4, ORIGIN4 = (0.7, 0.8, 2.5, 33.0), (10.0, -20.0, 5.0, 0.0)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _direction4() -> tuple[float, ...]:
    d = np.eye(4)
    d[:3, :3] = np.asarray(V.oblique_direction()).reshape(3, 3)
    return tuple(float(v) for v in d.ravel())


def _write_4d(path: Path, data: np.ndarray, pixel: type = np.float32) -> sitk.Image:
    """A 4D file from a (t, z, y, x) array, with an oblique direction: 16 x 16 x 4 x 3 for (3, 4, 16, 16)."""
    img = sitk.GetImageFromArray(data.astype(pixel), isVector=False)
    img.SetSpacing(SPACING4)
    img.SetOrigin(ORIGIN4)
    img.SetDirection(_direction4())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return img


@pytest.fixture
def cine(tmp_path):
    data = np.random.default_rng(0).normal(100, 20, size=(3, 4, 16, 16)).astype(np.float32)
    _write_4d(tmp_path / "in" / "cine_4d.nii.gz", data)
    return tmp_path / "in", data


def test_4d_without_frames_fails_with_its_shape_and_the_option(cine, tmp_path, capsys):
    folder, _ = cine
    before = _digest(folder)
    code, _, err = V.run_cli(capsys, "ingest", str(folder / "cine_4d.nii.gz"), "--out", str(tmp_path / "ds"))
    assert code == 4, err  # the only input: readable, but not a 3D case
    assert "4D volume (16 x 16 x 4 x 3: 3 frames of 16 x 16 x 4)" in err and "--frames split" in err
    assert "hint: run ingest again with --frames split" in err and "Traceback" not in err
    (row,) = _rows(tmp_path / "ds" / "ingest_report.csv")
    assert row["status"] == "failed:4d" and "16 x 16 x 4 x 3" in row["reason"] and "--frames N" in row["reason"]
    assert _digest(folder) == before


def test_frames_split_gives_one_case_per_frame_with_the_3d_geometry(cine, tmp_path, capsys):
    folder, data = cine
    other = tmp_path / "in" / "other_4d.nii.gz"  # a second patient: the split may separate files, never frames
    _write_4d(other, data[::-1] + 1)
    before = _digest(folder)
    out = tmp_path / "ds"
    code, _, err = V.run_cli(capsys, "ingest", str(folder), "--out", str(out), "--frames", "split",
                             "--val-fraction", "0.5")
    assert code == 0, err
    cases = {r["case_id"]: r for r in _rows(out / "cases.csv")}
    assert sorted(cases) == ["cine_4d_f00", "cine_4d_f01", "cine_4d_f02", "other_4d_f00", "other_4d_f01", "other_4d_f02"]
    for stem in ("cine_4d", "other_4d"):
        frames = [cases[f"{stem}_f{k:02d}"] for k in range(3)]
        assert {f["patient"] for f in frames} == {stem} and len({f["split"] for f in frames}) == 1
    assert {cases["cine_4d_f00"]["split"], cases["other_4d_f00"]["split"]} == {"train", "val"}
    for k in range(3):
        img = sitk.ReadImage(str(out / "images" / f"cine_4d_f{k:02d}.nii.gz"))
        assert img.GetDimension() == 3 and img.GetSize() == (16, 16, 4)
        np.testing.assert_allclose(img.GetSpacing(), SPACING4[:3], atol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), ORIGIN4[:3], atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), V.oblique_direction(), atol=1e-5)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), data[k])
    report = [r for r in _rows(out / "ingest_report.csv") if r["source"].endswith("cine_4d.nii.gz")]
    assert [(r["status"], r["case_id"], r["reason"]) for r in report] == [
        ("ok", f"cine_4d_f{k:02d}", f"frame {k} of 3 (16 x 16 x 4 x 3)") for k in range(3)]
    assert _digest(folder) == before
    code, out_text, err = V.run_cli(capsys, "validate", str(out))
    assert code == 0, out_text + err


def test_a_4d_label_is_split_with_its_image_and_a_3d_one_is_refused(cine, tmp_path, capsys):
    folder, data = cine
    labels = (data > 100).astype(np.uint8)
    _write_4d(tmp_path / "labs" / "cine_4d.nii.gz", labels, np.uint8)
    out = tmp_path / "ds"
    code, _, err = V.run_cli(capsys, "ingest", str(folder), "--labels", str(tmp_path / "labs"), "--out", str(out),
                             "--frames", "split")
    assert code == 0, err
    for k in range(3):
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels" / f"cine_4d_f{k:02d}.nii.gz")))
        np.testing.assert_array_equal(lab, labels[k])
    # a 3D label labels one frame: with split it is refused, with --frames N it labels frame N
    lab3 = sitk.GetImageFromArray(labels[1])
    lab3.SetSpacing(SPACING4[:3])
    lab3.SetOrigin(ORIGIN4[:3])
    lab3.SetDirection(V.oblique_direction())
    sitk.WriteImage(lab3, str(tmp_path / "labs" / "cine_4d.nii.gz"))
    code, _, err = V.run_cli(capsys, "ingest", str(folder), "--labels", str(tmp_path / "labs"),
                             "--out", str(tmp_path / "ds2"), "--frames", "split")
    assert code == 3, err
    assert {r["status"] for r in _rows(tmp_path / "ds2" / "ingest_report.csv")} == {"failed:label"}
    assert "labels one frame: keep that one with --frames N" in err
    assert "hint: ingest the labelled frame alone: --frames N (0-based)" in err
    code, _, err = V.run_cli(capsys, "ingest", str(folder), "--labels", str(tmp_path / "labs"),
                             "--out", str(tmp_path / "ds3"), "--frames", "1")
    assert code == 0, err
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ds3" / "labels" / "cine_4d.nii.gz"))),
                                  labels[1])


def test_frames_n_keeps_that_frame_only(cine, tmp_path, capsys):
    folder, data = cine
    out = tmp_path / "ds"
    code, _, err = V.run_cli(capsys, "ingest", str(folder), "--out", str(out), "--frames", "1")
    assert code == 0, err
    (case,) = _rows(out / "cases.csv")
    assert case["case_id"] == "cine_4d"
    img = sitk.ReadImage(str(out / "images" / "cine_4d.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), data[1])
    np.testing.assert_allclose(img.GetDirection(), V.oblique_direction(), atol=1e-5)
    code, _, err = V.run_cli(capsys, "ingest", str(folder), "--out", str(tmp_path / "ds2"), "--frames", "3")
    assert code == 4 and "has frames 0..2" in err
    code, _, err = V.run_cli(capsys, "ingest", str(folder), "--out", str(tmp_path / "ds3"), "--frames", "last")
    assert code == 2 and "neither 'split' nor a frame number" in err
    code, _, err = V.run_cli(capsys, "ingest", str(folder), "--out", str(tmp_path / "ds4"), "--frames", "0",
                             "--channels", "T1,T2")
    assert code == 2 and "--frames is not combined with --channels" in err


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_nan_and_inf_are_replaced_by_the_minimum_and_reported(tmp_path, capsys, suffix):
    arr = np.random.default_rng(1).normal(0, 50, size=(4, 12, 10)).astype(np.float32)
    arr[0, 0, :9] = np.nan
    arr[2, 5, 3], arr[3, 11, 9], arr[1, 0, 0] = np.nan, np.inf, -np.inf
    nan, inf = np.isnan(arr), np.isinf(arr)
    low = float(arr[np.isfinite(arr)].min())
    src = tmp_path / "in" / f"scan{suffix}"
    src.parent.mkdir()
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 0.9, 3.0))
    sitk.WriteImage(img, str(src))
    before = _digest(src.parent)
    out = tmp_path / "ds"
    code, _, err = V.run_cli(capsys, "ingest", str(src), "--out", str(out))
    assert code == 0, err
    note = f"replaced {int(nan.sum())} NaN and {int(inf.sum())} inf voxels by the minimum {low:g}"
    assert note == "replaced 10 NaN and 2 inf voxels by the minimum " + f"{low:g}"
    (row,) = _rows(out / "ingest_report.csv")
    assert row["status"] == "ok" and row["reason"] == note
    assert f"warning: in/scan{suffix}: {note}" in err
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / "scan.nii.gz")))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[nan | inf], np.float32(low))
    np.testing.assert_array_equal(got[~(nan | inf)], arr[~(nan | inf)])
    assert _digest(src.parent) == before
    code, out_text, err = V.run_cli(capsys, "validate", str(out))
    assert code == 0, out_text + err


def test_a_4d_dicom_series_is_split_and_reported_per_time_point(tmp_path):
    from medcl_cli.data.ingest import IngestRequest, ingest

    data = g.volume(12)  # 4 positions x 3 time points
    g.write_series(tmp_path / "in", data, positions=[2.0 * (k % 4) for k in range(12)])
    res = ingest(IngestRequest(inputs=[tmp_path / "in"], out=tmp_path / "ds"))
    assert res.cases == 3
    reasons = [r["reason"] for r in _rows(tmp_path / "ds" / "ingest_report.csv") if r["status"] == "ok"]
    assert sorted(reasons) == [f"4D: time point {t} of 3" for t in (1, 2, 3)]
    assert len({r["patient"] for r in _rows(tmp_path / "ds" / "cases.csv")}) == 1


def test_a_real_4d_nifti_from_dcm2niix_splits_into_its_frames(shared_data, tmp_path, capsys):
    """dcm2niix's GE 4D EPI (64 x 64 x 15 x 10, int16): every frame read back by nibabel, an independent
    reader, has the input's affine and exactly the input's voxels of that frame."""
    import nibabel as nib

    src = shared_data("dcm_qa_nih_ge_siemens_epi") / "reference_dcm2niix" / "DCM2NIIX_regression_test_4.nii"
    ref = nib.load(str(src))
    data = np.asarray(ref.dataobj)
    assert data.shape == (64, 64, 15, 10)
    out = tmp_path / "ds"
    code, _, err = V.run_cli(capsys, "ingest", str(src), "--out", str(out), "--frames", "split")
    assert code == 0, err
    cases = _rows(out / "cases.csv")
    assert [c["case_id"] for c in cases] == [f"DCM2NIIX_regression_test_4_f{k:02d}" for k in range(10)]
    assert {c["patient"] for c in cases} == {"DCM2NIIX_regression_test_4"} and len({c["split"] for c in cases}) == 1
    for k, c in enumerate(cases):
        got = nib.load(str(out / c["image"]))
        assert got.shape == (64, 64, 15)
        np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(got.dataobj), data[..., k])


def test_a_volume_with_no_finite_voxel_is_refused(tmp_path, capsys):
    src = tmp_path / "in" / "void.nii.gz"
    src.parent.mkdir()
    arr = np.full((3, 8, 8), np.nan, np.float32)
    arr[1] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(src))
    code, _, err = V.run_cli(capsys, "ingest", str(src), "--out", str(tmp_path / "ds"))
    assert code == 4, err
    assert "every voxel is NaN or inf (128 NaN, 64 inf)" in err and "hint: the file holds no finite voxel" in err
    (row,) = _rows(tmp_path / "ds" / "ingest_report.csv")
    assert row["status"] == "failed:nonfinite"


def test_nan_in_any_channel_of_a_channels_case_is_replaced_and_noted(tmp_path, capsys):
    rng = np.random.default_rng(2)
    src = tmp_path / "in"
    src.mkdir()
    arrays = [rng.normal(0, 1, size=(3, 8, 8)).astype(np.float32) for _ in range(2)]
    arrays[0][0, 0, 0] = np.nan
    arrays[1][2, 7, 7] = np.inf
    for k, arr in enumerate(arrays):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(src / f"pat_{k:04d}.nii.gz"))
    out = tmp_path / "ds"
    code, _, err = V.run_cli(capsys, "ingest", str(src), "--out", str(out), "--channels", "T1,T2")
    assert code == 0, err
    reasons = sorted(r["reason"] for r in _rows(out / "ingest_report.csv"))
    low0, low1 = (float(a[np.isfinite(a)].min()) for a in arrays)
    assert reasons == [f"channel 0 (T1) of pat; channel 0 replaced 1 NaN voxel by the minimum {low0:g}",
                       f"channel 1 (T2) of pat; channel 1 replaced 1 inf voxel by the minimum {low1:g}"]
    for k, arr in enumerate(arrays):
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / f"pat_{k:04d}.nii.gz")))
        bad = ~np.isfinite(arr)
        np.testing.assert_array_equal(got[bad], np.float32([low0, low1][k]))
        np.testing.assert_array_equal(got[~bad], arr[~bad])
