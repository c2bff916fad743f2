"""`medcl ingest` on the real shared data, checked voxel by voxel against dcm2niix, plus NIfTI (ACDC)
inputs, exit codes and atomic output."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medcl_cli.config import IngestConfig
from medcl_cli.data.ingest import IngestRequest, ingest
import dicomgen as g
from test_ingest_phi import cli

DCM2NIIX = shutil.which("dcm2niix") or str(Path(os.sys.executable).parent / "dcm2niix")


def dcm2niix_volumes(src: Path, out: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every 3D volume dcm2niix writes for `src` (4D split per time point), in RAS canonical orientation."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([DCM2NIIX, "-z", "n", "-b", "n", "-f", "%s_%d_%j", "-o", str(out), str(src)],
                   check=True, capture_output=True)
    vols = []
    for f in sorted(out.glob("*.nii")):
        img = nib.load(f)
        data = np.asarray(img.dataobj).astype(np.float64)  # the proxy applies scl_slope/scl_inter
        parts = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
        for t, part in enumerate(parts):
            can = nib.as_closest_canonical(nib.Nifti1Image(part, img.affine))
            vols.append((f"{f.stem}[{t}]", np.asarray(can.dataobj), can.affine))
    return vols


def ours(path: Path) -> tuple[np.ndarray, np.ndarray]:
    can = nib.as_closest_canonical(nib.load(path))
    return np.asarray(can.get_fdata()), can.affine


def match(vol: np.ndarray, aff: np.ndarray, refs: list[tuple[str, np.ndarray, np.ndarray]], exact: bool = True):
    """Names of the dcm2niix volumes with the same voxels, and the max affine difference to each."""
    hits = []
    for name, data, ref_aff in refs:
        if data.shape == vol.shape and (np.array_equal(data, vol) if exact else np.allclose(data, vol, rtol=1e-5, atol=1e-3)):
            hits.append((name, float(np.abs(ref_aff - aff).max())))
    return hits


@pytest.fixture(scope="module")
def tcia(shared_data, tmp_path_factory):
    src = shared_data("tcia_brain_tumor_progression_dicom")
    tmp = tmp_path_factory.mktemp("tcia")
    res = ingest(IngestRequest([src], tmp / "ds", label_series="Mask", meta=["PatientAge", "SliceLocation"]))
    return res, tmp / "ds", dcm2niix_volumes(src, tmp / "d2n")


def test_tcia_one_case_per_image_series_equal_to_dcm2niix(tcia):
    res, ds, refs = tcia
    cases = pd.read_csv(ds / "cases.csv", keep_default_na=False)
    assert res.cases == 10 and res.labelled == 10 and not res.partial
    assert set(cases["split"]) <= {"train", "val"}
    report = pd.read_csv(ds / "ingest_report.csv", keep_default_na=False)
    masks = report[report["description"] == "Mask_Tumor"]
    assert len(masks) == 4 and (masks["status"] == "label").all()
    for _, row in cases.iterrows():
        vol, aff = ours(ds / row["image"])
        hits = match(vol, aff, refs)
        assert len(hits) == 1 and hits[0][1] < 1e-3, (row["case_id"], hits)
        lab, laff = ours(ds / row["label"])
        lhits = match(lab, laff, refs)
        assert lhits and "Mask_Tumor" in lhits[0][0] and lhits[0][1] < 1e-3
        assert set(np.unique(lab)) == {0, 1}
    # the patients of one study's series are the same pseudonym, never the raw PatientID
    assert not cases["patient"].str.contains("PGBM").any()


def test_tcia_meta_per_slice(tcia):
    _, ds, _ = tcia
    meta = pd.read_csv(ds / "meta.csv", keep_default_na=False)
    cases = pd.read_csv(ds / "cases.csv", keep_default_na=False)
    assert len(meta) == cases["size_z"].sum() == 235
    first = meta[meta["case_id"] == "case_0001"]
    assert set(first["PatientAge"]) == {"051Y"} and set(first["PatientAge_years"]) == {51}
    loc = first["SliceLocation"].astype(float).to_numpy()
    assert np.all(np.abs(np.diff(loc)) == pytest.approx(6.5, abs=1e-3))  # ordered like the z axis
    info = __import__("json").loads((ds / "dataset.json").read_text())
    # the class takes the mask series' SeriesDescription, not class_1
    assert info["labels"] == {"0": "background", "1": "Mask_Tumor"} and info["counts"]["cases"] == 10


def test_qa_folders_equal_to_dcm2niix(shared_data, tmp_path):
    nih = shared_data("dcm_qa_nih_ge_siemens_epi")
    enh = shared_data("dcm_qa_enh_multiframe") / "In"
    ct = shared_data("dcmqi_ct_liver_seg")
    srcs = [nih / "GE_mr_0004", nih / "Siemens_mr_0003", enh / "Siemens" / "XA10", ct / "ct_3slice", ct / "liver_seg_dicom_SEG.dcm"]
    for i, s in enumerate(srcs):
        (tmp_path / "in" / f"{i}").mkdir(parents=True)
        if s.is_file():
            os.symlink(s, tmp_path / "in" / f"{i}" / s.name)
        else:
            for f in s.iterdir():
                os.symlink(f, tmp_path / "in" / f"{i}" / f.name)
    refs = dcm2niix_volumes(tmp_path / "in", tmp_path / "d2n")
    res = ingest(IngestRequest([tmp_path / "in"], tmp_path / "ds", meta=["SliceLocation"]))
    cases = pd.read_csv(tmp_path / "ds" / "cases.csv", keep_default_na=False)
    # GE 4D: 10 volumes of 15 slices; Siemens mosaic: 2 x 5; XA10 enhanced: 4 x 6; CT: 3 slices (+ SEG label)
    assert sorted(cases["size_z"].tolist()) == [3] + [5] * 2 + [6] * 4 + [15] * 10
    for _, row in cases.iterrows():
        vol, aff = ours(tmp_path / "ds" / row["image"])
        hits = match(vol, aff, refs, exact=False)
        assert len(hits) == 1 and hits[0][1] < 1e-3, (row["case_id"], row["flags"], hits)
        t = row["time_index"]
        if t != "":
            assert hits[0][0].endswith(f"[{int(float(t))}]")  # time points in dcm2niix's order
    seg = cases[cases["label"] != ""]
    assert len(seg) == 1
    lab, laff = ours(tmp_path / "ds" / seg.iloc[0]["label"])
    assert match(lab, laff, [r for r in refs if "Liver" in r[0]]), "SEG label differs from dcm2niix's SEG volume"
    info = __import__("json").loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["labels"] == {"0": "background", "1": "Liver"}
    assert not res.partial


def test_philips_enhanced_and_single_slices(shared_data, tmp_path):
    """Philips: dcm2niix writes its private 'precise' values, medcl the standard RescaleSlope/Intercept values,
    so voxels agree up to that linear map; single-slice files only with keep_localizers."""
    import pydicom

    src = shared_data("dcm_qa_enh_multiframe") / "In" / "Philips" / "IM_0027_fMAP.dcm"
    refs = dcm2niix_volumes(src.parent, tmp_path / "d2n")
    ingest(IngestRequest([src.parent], tmp_path / "ds", cfg=IngestConfig(keep_localizers=True, workers=1)))
    cases = pd.read_csv(tmp_path / "ds" / "cases.csv", keep_default_na=False)
    assert len(cases) == 2 and (cases["size_z"] == 32).all()
    ds = pydicom.dcmread(src)
    raw = ds.pixel_array.astype(np.float64)
    for _, row in cases.iterrows():
        vol, aff = ours(tmp_path / "ds" / row["image"])
        corr = [(n, abs(np.corrcoef(d.ravel(), vol.ravel())[0, 1]), np.abs(a - aff).max()) for n, d, a in refs
                if d.shape == vol.shape]
        best = max(corr, key=lambda c: c[1])
        assert best[1] > 0.9999 and best[2] < 1e-3
    # the values are the DICOM rescale of the stored pixels (frames 32..63 are the field map)
    fmap = ds.PerFrameFunctionalGroupsSequence[32].PixelValueTransformationSequence[0]
    expected = raw[32:] * float(fmap.RescaleSlope) + float(fmap.RescaleIntercept)
    vals = [np.sort(ours(tmp_path / "ds" / r["image"])[0].ravel()) for _, r in cases.iterrows()]
    assert any(np.allclose(v, np.sort(expected.ravel()), atol=1e-3) for v in vals)


def _acdc_subset(acdc: Path, tmp: Path, patients: list[str]) -> Path:
    for sub in ("images", "labels"):
        (tmp / sub).mkdir(parents=True)
        for p in patients:
            for f in sorted((acdc / sub).glob(f"{p}_*.nii.gz")):
                os.symlink(f, tmp / sub / f.name)
    return tmp


def test_acdc_subset_with_labels_meta_and_splits(shared_data, tmp_path, capsys):
    acdc = shared_data("acdc")
    splits = pd.read_csv(acdc / "splits.csv")
    val = splits[splits["split"] == "val"]["case_id"].str[:10].unique()[:1].tolist()
    train = splits[splits["split"] == "train"]["case_id"].str[:10].unique()[:2].tolist()
    sub = _acdc_subset(acdc, tmp_path / "acdc", train + val)
    out = tmp_path / "ds"
    r = cli(capsys, "ingest", str(sub / "images"), "--labels", str(sub / "labels"), "--meta-csv", str(acdc / "info.csv"),
            "--split-file", str(acdc / "splits.csv"), "--out", str(out), "--label-names", "1=RV,2=Myo,3=LV")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == str(out.resolve()) and "medcl finetune --data" in r.stdout
    cases = pd.read_csv(out / "cases.csv", keep_default_na=False)
    assert len(cases) == 6 and (cases["label"] != "").all()
    assert (cases["split"] == "val").sum() == 2 and (cases["split"] == "train").sum() == 4
    assert cases["patient"].nunique() == 3 and set(cases["phase"]) == {"ED", "ES"}
    meta = pd.read_csv(out / "meta.csv", keep_default_na=False)
    assert {"patient", "phase", "group"} <= set(meta.columns) and len(meta) == cases["size_z"].sum()
    info = __import__("json").loads((out / "dataset.json").read_text())
    assert info["labels"] == {"0": "background", "1": "RV", "2": "Myo", "3": "LV"}
    v = cli(capsys, "validate", str(out))
    assert v.exit_code == 0, v.output


@pytest.mark.slow
def test_acdc_full(shared_data, tmp_path):
    acdc = shared_data("acdc")
    res = ingest(IngestRequest([acdc / "images"], tmp_path / "ds", labels_dir=acdc / "labels",
                               meta_csv=acdc / "info.csv", split_file=acdc / "splits.csv"))
    assert res.cases == 160 and res.splits == {"train": 140, "val": 20, "test": 0} and res.labelled == 160


def test_nifti_label_on_other_grid_is_an_error(tmp_path):
    import SimpleITK as sitk

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for name, spacing in (("a_0000", 1.0), ("b_0000", 1.0)):
        img = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32))
        sitk.WriteImage(img, str(tmp_path / "img" / f"{name}.nii.gz"))
        lab = sitk.GetImageFromArray(np.ones((4, 8, 8), np.uint8))
        lab.SetSpacing((1.0, 1.0, 2.0 if name.startswith("b") else 1.0))
        sitk.WriteImage(lab, str(tmp_path / "lab" / f"{name[:1]}.nii.gz"))
    res = ingest(IngestRequest([tmp_path / "img"], tmp_path / "ds", labels_dir=tmp_path / "lab"))
    assert res.cases == 1 and res.partial
    report = pd.read_csv(tmp_path / "ds" / "ingest_report.csv", keep_default_na=False)
    assert "spacing" in report[report["status"] == "failed:label-grid"].iloc[0]["reason"]


def test_exit_codes_and_messages(tmp_path, capsys):
    g.write_series(tmp_path / "in" / "ok", g.volume(3))
    r = cli(capsys, "ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert r.exit_code == 3 and "error: input not found" in r.stderr and "hint:" in r.stderr
    r = cli(capsys, "ingest", str(tmp_path / "in"), "--out", str(tmp_path / "x"), "--meta", "SliceLocaton")
    assert r.exit_code == 2 and "did you mean 'SliceLocation'" in r.stderr
    r = cli(capsys, "ingest", str(tmp_path / "in"), "--out", str(tmp_path / "x"), "--meta", "PatientID")
    assert r.exit_code == 2 and "--allow-phi" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    r = cli(capsys, "ingest", str(tmp_path / "in"), "--out", str(tmp_path / "full"))
    assert r.exit_code == 6 and "--overwrite" in r.stderr
    assert (tmp_path / "full" / "keep.txt").exists()
    g.write_series(tmp_path / "in" / "gap", g.volume(5), positions=[0, 2, 4, 10, 12])
    r = cli(capsys, "ingest", str(tmp_path / "in"), "--out", str(tmp_path / "full"), "--overwrite")
    assert r.exit_code == 5 and "ingest_report.csv" in r.stderr and "failed:gap" in r.stdout
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "cases.csv").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing")
    r = cli(capsys, "ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "y"))
    assert r.exit_code == 3 and "ignored:not-dicom" in r.stderr
    # the report is written on every exit, and a folder holding only it is no dataset: a re-run may replace it
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == ["ingest_report.csv"]
    r = cli(capsys, "ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "y"))
    assert r.exit_code == 3, r.stderr


def test_failed_ingest_leaves_no_half_dataset(tmp_path, monkeypatch):
    import medcl_cli.data.ingest as mod

    g.write_series(tmp_path / "in", g.volume(3))

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("disk went away")

    monkeypatch.setattr(mod, "write_json_atomic", boom)
    with pytest.raises(RuntimeError):
        ingest(IngestRequest([tmp_path / "in"], tmp_path / "ds", cfg=IngestConfig(workers=1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_labels_folder_inside_the_input_is_not_ingested_as_images(tmp_path):
    import SimpleITK as sitk

    for sub in ("images", "labels"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for name in ("a", "b"):
        img = sitk.GetImageFromArray(np.random.default_rng(0).random((3, 8, 8)).astype(np.float32))
        sitk.WriteImage(img, str(tmp_path / "data" / "images" / f"{name}_0000.nii.gz"))
        lab = sitk.GetImageFromArray(np.ones((3, 8, 8), np.uint8) * 2)
        sitk.WriteImage(lab, str(tmp_path / "data" / "labels" / f"{name}.nii.gz"))
    res = ingest(IngestRequest([tmp_path / "data"], tmp_path / "ds", labels_dir=tmp_path / "data" / "labels",
                               cfg=IngestConfig(workers=1)))
    assert res.cases == 2 and res.labelled == 2 and not res.partial
    cases = pd.read_csv(tmp_path / "ds" / "cases.csv", keep_default_na=False)
    assert sorted(cases["case_id"]) == ["a", "b"]
    info = __import__("json").loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["labels"] == {"0": "background", "2": "class_2"}


def test_pydicom_multiframe_folder_equal_to_dcm2niix(shared_data, tmp_path):
    """Enhanced CT (2 frames) and two single-slice files (kept with keep_localizers) equal dcm2niix's volumes;
    emri_small.dcm has no orientation at all: reported, not guessed."""
    src = shared_data("pydicom_data_multiframe")
    refs = dcm2niix_volumes(src, tmp_path / "d2n")
    res = ingest(IngestRequest([src], tmp_path / "ds", cfg=IngestConfig(keep_localizers=True, workers=1)))
    cases = pd.read_csv(tmp_path / "ds" / "cases.csv", keep_default_na=False)
    assert sorted(cases["size_z"].tolist()) == [1, 1, 2]
    for _, row in cases.iterrows():
        vol, aff = ours(tmp_path / "ds" / row["image"])
        hits = match(vol, aff, refs)
        assert len(hits) == 1 and hits[0][1] < 1e-3, (row["case_id"], hits)
    report = pd.read_csv(tmp_path / "ds" / "ingest_report.csv", keep_default_na=False)
    assert (report["status"] == "failed:no-geometry").sum() == 1 and res.partial
