"""`medcl predict`: outputs on the input grid, sidecars, resume by skipping, partial failure, DICOM SEG."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

import volumes as V
from medcl_cli.data.io import read_image


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return V.write_run(tmp_path_factory.mktemp("pr") / "run")


def _scans(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    masks = {}
    for i in range(n):
        img, lab = V.blob_volume((38 + 4 * i, 33, 4), seed=70 + i)
        suffix = (".nii.gz", ".nrrd", ".mha")[i % 3]
        sitk.WriteImage(V.oblique_image(img), str(folder / f"scan{i}{suffix}"))
        masks[f"scan{i}"] = lab
    return masks


def test_predict_files_and_folders_resume_and_overwrite(run, tmp_path, capsys):
    masks = _scans(tmp_path / "in")
    out = tmp_path / "out"
    code, stdout, err = V.run_cli(capsys, "predict", str(run), str(tmp_path / "in"), "--out", str(out))
    assert code == 0, err
    assert "3 written" in stdout
    for name, lab in masks.items():
        src = next((tmp_path / "in").glob(f"{name}.*"))
        pred, inp = read_image(out / f"{name}.nii.gz"), read_image(src)
        assert pred.GetSize() == inp.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), inp.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(pred.GetOrigin(), inp.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pred.GetDirection(), inp.GetDirection(), atol=1e-6)
        assert V.dice(sitk.GetArrayFromImage(pred), lab) > 0.9
        side = json.loads((out / f"{name}.json").read_text())
        assert side["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert side["label_map"] == {"0": "background", "1": "blob"}
        assert side["run_id"] == "run" and side["method"] == "supervised"
        assert side["geometry"]["size"] == list(inp.GetSize())
    # a killed run: one case lost its sidecar (written last) -> only that case is redone
    (out / "scan1.json").unlink()
    before = (out / "scan0.nii.gz").stat().st_mtime_ns
    code, stdout, _ = V.run_cli(capsys, "predict", str(run), str(tmp_path / "in"), "--out", str(out), "--json")
    res = json.loads(stdout)
    assert code == 0 and res["written"] == ["scan1"] and sorted(res["skipped"]) == ["scan0", "scan2"]
    assert (out / "scan0.nii.gz").stat().st_mtime_ns == before
    code, stdout, _ = V.run_cli(capsys, "predict", str(run), str(tmp_path / "in" / "scan0.nii.gz"), "--out", str(out),
                                "--overwrite", "--json")
    assert code == 0 and json.loads(stdout)["written"] == ["scan0"]
    assert not list(out.glob(".tmp-*"))
    # an output folder inside the input folder: its masks are never taken as new inputs
    inner = tmp_path / "in" / "preds"
    for rnd in range(2):
        code, stdout, _ = V.run_cli(capsys, "predict", str(run), str(tmp_path / "in"), "--out", str(inner), "--json")
        res = json.loads(stdout)
        assert code == 0 and len(res["written"]) + len(res["skipped"]) == 3 and len(res["skipped"]) == 3 * rnd


def test_partial_failure_and_nothing_found(run, tmp_path, capsys):
    _scans(tmp_path / "in", n=2)
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a nifti at all")
    out = tmp_path / "out"
    code, stdout, err = V.run_cli(capsys, "predict", str(run), str(tmp_path / "in"), str(tmp_path / "nope.nii.gz"),
                                  "--out", str(out))
    assert code == 5, err
    assert "2 written" in stdout and "2 failed" in stdout
    assert "broken.nii.gz" in err and "Traceback" not in err
    assert (out / "scan0.nii.gz").is_file() and (out / "scan1.json").is_file()
    assert not (out / "broken.json").exists() and not (out / "broken.nii.gz").exists()
    # nothing at all predicted: invalid data (4), not a partial success (5)
    import numpy as np
    import SimpleITK as sitk

    cine = tmp_path / "cine_4d.nii.gz"  # found and read, then refused by the model's input check
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 16, 16), np.float32), isVector=False), str(cine))
    code, stdout, err = V.run_cli(capsys, "predict", str(run), str(cine), "--out", str(tmp_path / "out2"))
    assert code == 4, err
    assert "no input could be segmented" in err and "4D" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = V.run_cli(capsys, "predict", str(run), str(tmp_path / "empty"), "--out", str(out))
    assert code == 3 and "no volumes or DICOM series" in err


def test_dicom_seg_needs_dicom_inputs(run, tmp_path, capsys):
    _scans(tmp_path / "in", n=1)
    code, _, err = V.run_cli(capsys, "predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                             "--format", "dicom-seg")
    assert code == 2 and "DICOM inputs" in err


@pytest.mark.parametrize("zipped", [False, True])
def test_dicom_seg_output_matches_the_mask_and_hides_phi(run, tmp_path, capsys, zipped):
    """A DICOM folder, or the same files in a zip archive (the SEG writer reads the archive's members)."""
    pytest.importorskip("highdicom")
    import zipfile

    import pydicom

    img, _ = V.blob_volume((40, 34, 5), seed=80, scale=500.0)
    files = V.write_dicom_series(V.oblique_image(img, sitk.sitkInt16), tmp_path / "dcm" / "s1", patient="Doe^Jane")
    src = tmp_path / "dcm"
    if zipped:
        src = tmp_path / "series.zip"
        with zipfile.ZipFile(src, "w") as zf:
            for f in files:
                zf.write(f, f.name)
    out = tmp_path / "out"
    code, _, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(out), "--format", "dicom-seg")
    assert code == 0, err
    (seg_path,) = list(out.glob("*.seg.dcm"))
    name = seg_path.name[: -len(".seg.dcm")]
    mask = read_image(out / f"{name}.nii.gz")
    side = json.loads((out / f"{name}.json").read_text())
    assert side["dicom_seg"] == seg_path.name and side["format"] == "dicom-seg"
    seg = pydicom.dcmread(str(seg_path))
    # the SEG's patient is the series' UID pseudonym (unique per series), the file is named after the series
    pseudonym = str(seg.PatientName).rstrip("^")
    assert seg.Modality == "SEG" and re.fullmatch(r"series_[0-9a-f]{12}", pseudonym) and seg.PatientID == pseudonym
    assert "Doe" not in seg_path.read_bytes().decode("latin1") and name.startswith("series_")
    assert seg.SegmentSequence[0].SegmentLabel == "blob"
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    assert len(frames) == len(files)  # one frame per source image (one foreground class)
    arr = sitk.GetArrayFromImage(mask)
    refs = {pydicom.dcmread(str(f)).SOPInstanceUID: f for f in files}
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ipp = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        k = round(mask.TransformPhysicalPointToContinuousIndex(ipp)[2])
        np.testing.assert_array_equal(frames[i] > 0, arr[k] == 1)
        src_uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert src_uid in refs
    assert arr.any()


def _frame_position(ds, index: int) -> np.ndarray:
    groups = ds.PerFrameFunctionalGroupsSequence[index]
    holder = groups if "PlanePositionSequence" in groups else ds.SharedFunctionalGroupsSequence[0]
    seq = holder.PlanePositionSequence
    return np.asarray([float(v) for v in seq[0].ImagePositionPatient])


@pytest.mark.parametrize("vendor,volumes", [("Siemens", 4), ("Philips", 2)])
def test_dicom_seg_references_the_frames_of_enhanced_multiframe_sources(
    run, tmp_path, capsys, shared_data, vendor, volumes
):
    """Real enhanced MR: Siemens XA10 (4 files, one time point each) and Philips (one file, magnitude + field
    map at the same 32 positions). Each volume's SEG has one frame per slice, on the slice's position, and
    references source frames of its own file at that position; the mask read back equals the NIfTI."""
    pytest.importorskip("highdicom")
    import pydicom

    src = shared_data("dcm_qa_enh_multiframe") / "In" / vendor
    out = tmp_path / "out"
    code, _, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(out), "--format", "dicom-seg")
    assert code == 0, err
    segs = sorted(out.glob("*.seg.dcm"))
    assert len(segs) == volumes
    headers = (pydicom.dcmread(str(f), stop_before_pixels=True) for f in src.rglob("*.dcm"))
    sources = {ds.SOPInstanceUID: ds for ds in headers}
    phi = {str(ds.get(k, "")) for ds in sources.values() for k in ("PatientName", "InstitutionName")} - {""}
    assert phi
    used_files = set()
    for seg_path in segs:
        seg = pydicom.dcmread(str(seg_path))
        raw = seg_path.read_bytes().decode("latin1")
        assert not [p for p in phi if p in raw]
        mask = read_image(out / (seg_path.name[: -len(".seg.dcm")] + ".nii.gz"))
        arr = sitk.GetArrayFromImage(mask)
        frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        assert "PatientAge" not in seg and len(frames) == arr.shape[0] * max(1, len(seg.SegmentSequence))
        seen = set()
        for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
            ipp = np.asarray([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
            k = round(mask.TransformPhysicalPointToContinuousIndex(ipp.tolist())[2])
            ident = fg if "SegmentIdentificationSequence" in fg else seg.SharedFunctionalGroupsSequence[0]
            number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            np.testing.assert_array_equal(frames[i] > 0, arr[k] == number)
            seen.add(k)
            refs = fg.DerivationImageSequence[0].SourceImageSequence
            assert len(refs) >= 1
            for ref in refs:
                source = sources[ref.ReferencedSOPInstanceUID]
                used_files.add(ref.ReferencedSOPInstanceUID)
                frame = int(ref.ReferencedFrameNumber)
                assert 1 <= frame <= int(source.NumberOfFrames)
                np.testing.assert_allclose(_frame_position(source, frame - 1), ipp, atol=1e-3)
        assert seen == set(range(arr.shape[0]))  # every slice of the volume, each on its own position
    assert len(used_files) == (4 if vendor == "Siemens" else 1)


def test_missing_highdicom_and_broken_dicom(run, tmp_path, capsys, monkeypatch):
    import sys

    from medcl_cli.predict.seg_writer import require_highdicom
    from medcl_cli.errors import UsageError

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "highdicom", None)  # as if not installed
        with pytest.raises(UsageError) as exc:
            require_highdicom()
        assert "pip install 'medcl[dicom-seg]'" in exc.value.hint
    img, _ = V.blob_volume((30, 28, 4), seed=90)
    files = V.write_dicom_series(V.oblique_image(img, sitk.sitkInt16), tmp_path / "dcm" / "good")
    bad = tmp_path / "dcm" / "bad" / "IM0000.dcm"
    bad.parent.mkdir()
    bad.write_bytes(files[0].read_bytes()[:-300])  # truncated pixel data
    code, stdout, err = V.run_cli(capsys, "predict", str(run), str(tmp_path / "dcm"), "--out", str(tmp_path / "o"))
    assert code == 5, err
    assert "1 written" in stdout and "truncated" in err
    assert len(list((tmp_path / "o").glob("series_*.nii.gz"))) == 1


def test_dicom_seg_refuses_unplaceable_sources(tmp_path, shared_data):
    """Two error paths of the SEG writer, each a clear InvalidDataError: slices spread over several
    enhanced multi-frame files (a SEG references one multi-frame image), and a source without a position."""
    pytest.importorskip("highdicom")
    from types import SimpleNamespace

    from medcl_cli.predict.seg_writer import _slice_index, write_dicom_seg
    from medcl_cli.errors import InvalidDataError

    siemens = sorted((shared_data("dcm_qa_enh_multiframe") / "In" / "Siemens").rglob("*.dcm"))[:2]
    assert len(siemens) == 2
    vol = sitk.Image(64, 64, 6, sitk.sitkUInt8)
    model = SimpleNamespace(label_map={0: "background", 1: "brain"})
    with pytest.raises(InvalidDataError, match="come from 2 files"):
        write_dicom_seg(vol, vol, siemens, model, tmp_path / "x.seg.dcm", "x")
    assert not (tmp_path / "x.seg.dcm").exists()
    with pytest.raises(InvalidDataError, match="no position or orientation"):
        _slice_index(None, [1, 0, 0, 0, 1, 0], 64, 64, vol)
