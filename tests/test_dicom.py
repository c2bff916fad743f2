"""DICOM edge cases on synthetic series written by tests/dicomgen.py: ordering, rescale, gaps, duplicates,
tilt, variable spacing, mixed series, echoes, 4D, multi-frame, corrupt/non-DICOM files, zip, SR, codec."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from medcl_cli.config import IngestConfig
from medcl_cli.data.dicom.codecs import decoder_available
from medcl_cli.data.ingest import IngestRequest, ingest
import dicomgen as g

CFG = IngestConfig(workers=1)
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def run(tmp: Path, inputs: list[Path], **kw: object) -> tuple[object, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    out = tmp / "ds"
    kw.setdefault("cfg", CFG)
    res = ingest(IngestRequest(inputs=inputs, out=out, **kw))  # type: ignore[arg-type]
    cases = pd.read_csv(out / "cases.csv", dtype={"label": str}, keep_default_na=False)
    report = pd.read_csv(out / "ingest_report.csv", dtype=str, keep_default_na=False)
    meta = pd.read_csv(out / "meta.csv", keep_default_na=False)
    return res, cases, report, meta


def array(tmp: Path, case_id: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "ds" / "images" / f"{case_id}.nii.gz")))


def test_sorted_by_position_not_instance_number(tmp_path):
    data = g.volume(6)
    # instance numbers reversed and shuffled file names: only IPP tells the order
    g.write_series(tmp_path / "in", data, instance_order=[3, 0, 5, 1, 4, 2], names=[f"x{k}" for k in "qwerty"])
    res, cases, report, meta = run(tmp_path, [tmp_path / "in"], meta=["SliceLocation", "InstanceNumber"])
    assert res.cases == 1 and res.failed == 0
    np.testing.assert_array_equal(array(tmp_path, "case_0001"), data)
    img = sitk.ReadImage(str(tmp_path / "ds" / "images" / "case_0001.nii.gz"))
    assert img.GetSpacing() == pytest.approx((0.7, 0.8, 2.0))  # x = column spacing, y = row spacing
    assert img.GetOrigin() == pytest.approx((-10.0, -20.0, 30.0))
    assert meta["SliceLocation"].tolist() == pytest.approx([30.0 + 2 * k for k in range(6)])
    assert meta["InstanceNumber"].astype(int).tolist() == [4, 1, 6, 2, 5, 3]
    assert meta["slice_position"].tolist() == pytest.approx(np.linspace(0, 1, 6))


def test_rescale_slope_intercept_applied(tmp_path):
    data = g.volume(4)
    g.write_series(tmp_path / "in", data, slope=2.0, intercept=-1024.0, modality="CT", sop_class=g.CT)
    run(tmp_path, [tmp_path / "in"])
    out = array(tmp_path, "case_0001")
    np.testing.assert_array_equal(out, data.astype(np.float64) * 2 - 1024)
    assert out.dtype == np.int16


def test_gap_is_reported_not_converted(tmp_path):
    data = g.volume(6)
    g.write_series(tmp_path / "gap", data, positions=[0, 2, 4, 10, 12, 14])
    g.write_series(tmp_path / "fine", g.volume(3))
    res, cases, report, _ = run(tmp_path, [tmp_path])
    assert res.cases == 1 and res.partial
    row = report[report["status"] == "failed:gap"].iloc[0]
    assert "missing slice" in row["reason"] and "2 missing" in row["reason"].replace("about ", "")


def test_duplicates_identical_dropped_different_flagged(tmp_path):
    data = g.volume(4)
    g.write_series(tmp_path / "dup_same", np.concatenate([data, data[1:2]]), positions=[0, 2, 4, 6, 2])
    other = data.copy()
    other[1] += 1
    g.write_series(tmp_path / "dup_diff", np.concatenate([data, other[1:2]]), positions=[0, 2, 4, 6, 2])
    res, cases, report, _ = run(tmp_path, [tmp_path])
    assert res.cases == 1
    ok = report[report["status"] == "ok"].iloc[0]
    assert "duplicate" in ok["reason"]
    np.testing.assert_array_equal(array(tmp_path, ok["case_id"]), data)
    assert (report["status"] == "failed:duplicates").sum() == 1


def test_gantry_tilt_resampled_to_orthogonal_grid(tmp_path):
    # a cylinder along the scanner z axis acquired with slices sheared by exactly one row per slice
    n, size = 5, 24
    truth = np.zeros((n, size, size), np.int16)
    truth[:, 8:14, 9:15] = 500
    sheared = np.stack([np.roll(truth[k], -k, axis=0) for k in range(n)])
    shifts = [(0.0, k * 0.8) for k in range(n)]  # IPP moves one row (0.8 mm) per slice along the column axis
    g.write_series(tmp_path / "in", sheared, inplane_shift=shifts, spacing=(0.8, 0.7), step=2.0)
    res, cases, report, _ = run(tmp_path, [tmp_path / "in"])
    assert "gantry tilt" in report[report["status"] == "ok"].iloc[0]["reason"]
    out = array(tmp_path, "case_0001")
    np.testing.assert_allclose(out[:, 6:18, :], truth[:, 6:18, :], atol=1e-3)
    img = sitk.ReadImage(str(tmp_path / "ds" / "images" / "case_0001.nii.gz"))
    assert np.allclose(np.asarray(img.GetDirection()).reshape(3, 3), np.eye(3))
    assert img.GetSpacing()[2] == pytest.approx(2.0)


def test_variable_spacing_resampled_to_median(tmp_path):
    g.write_series(tmp_path / "in", g.volume(5), positions=[0, 2, 4.4, 6.2, 8.0])
    res, cases, report, meta = run(tmp_path, [tmp_path / "in"], meta=["SliceLocation"])
    assert "variable spacing" in report[report["status"] == "ok"].iloc[0]["reason"]
    assert cases.loc[0, "size_z"] == 5 and cases.loc[0, "spacing_z"] == pytest.approx(1.9)
    assert len(meta) == 5


def test_mixed_series_and_echoes_split(tmp_path):
    study = "1.2.3.4.5"
    g.write_series(tmp_path / "all", g.volume(4, seed=1), study=study, series="1.2.3.4.5.1", description="a",
                   names=[f"a{k}" for k in range(4)])
    g.write_series(tmp_path / "all", g.volume(5, seed=2), study=study, series="1.2.3.4.5.2", description="b",
                   names=[f"b{k}" for k in range(5)])
    for echo in (1, 2):
        g.write_series(tmp_path / "all", g.volume(3, seed=echo), study=study, series="1.2.3.4.5.3", echo=echo,
                       description="me", names=[f"e{echo}_{k}" for k in range(3)])
    res, cases, report, _ = run(tmp_path, [tmp_path / "all"])
    assert res.cases == 4 and not res.partial
    assert sorted(cases["size_z"].tolist()) == [3, 3, 4, 5]
    assert report["reason"].str.contains("split by echo").sum() == 2


def test_4d_series_split_per_time_point(tmp_path):
    data = g.volume(12)  # 4 positions x 3 time points, interleaved instance order
    positions = [2.0 * (k % 4) for k in range(12)]
    g.write_series(tmp_path / "in", data, positions=positions)
    res, cases, report, _ = run(tmp_path, [tmp_path / "in"])
    assert res.cases == 3 and (cases["size_z"] == 4).all()
    for t in range(3):
        np.testing.assert_array_equal(array(tmp_path, f"case_{t + 1:04d}"), data[t * 4:(t + 1) * 4])
    assert cases["time_index"].astype(int).tolist() == [0, 1, 2]


def test_enhanced_multiframe_uses_functional_groups(tmp_path):
    data = g.volume(5)
    positions = [12.0, 0.0, 6.0, 3.0, 9.0]  # frames stored out of order
    g.write_enhanced(tmp_path / "in" / "mf.dcm", data, positions)
    res, cases, report, meta = run(tmp_path, [tmp_path / "in"], meta=["ImagePositionPatient", "SliceLocation"])
    order = np.argsort(positions)
    np.testing.assert_array_equal(array(tmp_path, "case_0001"), data[order])
    assert meta["SliceLocation"].astype(float).tolist() == pytest.approx([0, 3, 6, 9, 12])
    assert meta["ImagePositionPatient"].iloc[2].split("\\")[2] in ("6", "6.0")


def test_corrupt_truncated_and_non_dicom_files_are_reported(tmp_path):
    g.write_series(tmp_path / "in", g.volume(4))
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    (tmp_path / "in" / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    extra = g.write_series(tmp_path / "in2", g.volume(3, seed=5))
    data = extra[0].read_bytes()
    extra[0].write_bytes(data[: len(data) - 200])
    res, cases, report, _ = run(tmp_path, [tmp_path / "in", tmp_path / "in2"])
    status = dict(zip(report["source"].str.rsplit("/", n=1).str[-1], report["status"]))
    assert status["notes.txt"] == "ignored:not-dicom"
    assert status["bad.dcm"].startswith("failed:")
    assert status[extra[0].name] == "failed:truncated"
    assert res.cases == 2 and res.partial  # the 2 remaining slices of in2 still form a volume


def test_zip_archive_input(tmp_path):
    data = g.volume(4)
    paths = g.write_series(tmp_path / "in", data)
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as zf:
        for p in paths:
            zf.write(p, f"nested/{p.name}")
    shutil.rmtree(tmp_path / "in")
    res, cases, report, _ = run(tmp_path, [tmp_path / "series.zip"])
    assert res.cases == 1
    np.testing.assert_array_equal(array(tmp_path, "case_0001"), data)


def test_localizer_sr_and_codec(tmp_path):
    g.write_series(tmp_path / "scout", g.volume(3), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    g.write_series(tmp_path / "single", g.volume(1))
    g.write_sr(tmp_path / "sr.dcm")
    g.write_jpeg_series(tmp_path / "jpeg")
    g.write_series(tmp_path / "good", g.volume(3))
    res, cases, report, _ = run(tmp_path, [tmp_path])
    statuses = report["status"].tolist()
    assert statuses.count("ignored:localizer") == 2
    assert "ignored:non-image" in statuses
    # bogus JPEG Baseline data: refused with the package to install, or, with python-gdcm installed (a
    # dependency), reported as undecodable data
    if decoder_available(JPEG_BASELINE):
        bad = report[report["status"] == "failed:pixels"]
        assert len(bad) == 1 and "cannot be decoded by python-gdcm" in bad.iloc[0]["reason"]
    else:
        codec = report[report["status"] == "failed:codec"]
        assert len(codec) == 1 and "pip install python-gdcm" in codec.iloc[0]["reason"]
    assert res.cases == 1 and res.partial


def test_mask_series_on_other_grid_is_an_error(tmp_path):
    study = "1.2.3.9"
    g.write_series(tmp_path / "img", g.volume(4), study=study, description="T1")
    mask = (g.volume(4) > 200).astype(np.int16)
    g.write_series(tmp_path / "mask", mask, study=study, description="Mask_Tumor", step=3.0)
    res, cases, report, _ = run(tmp_path, [tmp_path], label_series="Mask")
    row = report[report["description"] == "Mask_Tumor"].iloc[0]
    assert row["status"] == "failed:label-grid" and "spacing" in row["reason"]
    assert cases.loc[0, "label"] == "" and res.partial


def test_files_without_preamble_read_with_force_and_marked(tmp_path):
    data = g.volume(3)
    paths = g.write_series(tmp_path / "in", data)
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    for p in paths:  # no preamble, no "DICM", no file meta: a bare implicit-VR dataset, as old exports are
        ds = pydicom.dcmread(p)
        del ds.file_meta
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)
        p.write_bytes(fp.getvalue())
        assert p.read_bytes()[128:132] != b"DICM"
    res, cases, report, _ = run(tmp_path, [tmp_path / "in"])
    assert res.cases == 1
    assert "read with force" in report[report["status"] == "ok"].iloc[0]["reason"]
    np.testing.assert_array_equal(array(tmp_path, "case_0001"), data)


def test_copies_of_the_same_instances_are_not_a_4d_series(tmp_path):
    data = g.volume(4)
    paths = g.write_series(tmp_path / "in" / "a", data)
    (tmp_path / "in" / "b").mkdir()
    for p in paths:  # the same files exported twice into another folder
        shutil.copy(p, tmp_path / "in" / "b" / p.name)
    res, cases, report, _ = run(tmp_path, [tmp_path / "in"])
    assert res.cases == 1 and cases.loc[0, "size_z"] == 4
    assert "4 copy(ies)" in report[report["status"] == "ok"].iloc[0]["reason"]
    np.testing.assert_array_equal(array(tmp_path, "case_0001"), data)
