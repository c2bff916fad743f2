"""Multi-sequence input (--channels): ingest of the real TCIA brain-tumour DICOM (T1post, FLAIR_reg, T2_reg +
Mask_Tumor) and of NIfTI files in the three documented layouts, then a short finetune, evaluate, predict
with three files (and with a DICOM study folder) and both exports, all through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from medcl_cli.config import AugmentConfig
from medcl_cli.data.augment import make_views
from medcl_cli.data.channels import assign_channels, parse_channels
from medcl_cli.data.channels_nifti import classify
from medcl_cli.errors import UsageError

CH = "T1post,FLAIR,T2"
TINY_NET = ["--image-size", "32", "--batch-size", "2", "--set", "model.channels=[4,8,16,32]", "--device", "cpu"]


# ---- names -------------------------------------------------------------------------------------------------


def test_channel_names_match_exact_then_prefix_then_substring():
    descs = ["T1post", "FLAIR_reg", "T2_reg", "Mask_Tumor"]
    assert assign_channels(["T1post", "FLAIR", "T2"], descs) == ([0, 1, 2], "")
    assert assign_channels(["t1POST", "flair"], descs)[0] == [0, 1]  # case-insensitive
    # an exact match wins over a prefix match: T1 -> "T1", not "T1post"
    assert assign_channels(["T1"], ["T1post", "T1"])[0] == [1]
    picks, why = assign_channels(["T1"], ["T1post", "T1prereg"])
    assert picks is None and "equally well" in why and "T1prereg" in why
    picks, why = assign_channels(["T1post", "ADC"], descs)
    assert picks is None and "'ADC'" in why and "FLAIR_reg" in why
    with pytest.raises(UsageError):
        parse_channels("T1post,,T2")
    with pytest.raises(UsageError):
        parse_channels("T2,t2")
    with pytest.raises(UsageError):
        parse_channels("T1post")


def test_nifti_layouts_are_recognised():
    chans = ["T1post", "FLAIR", "T2"]
    f = classify(Path("/d/BraTS_001_0002.nii.gz"), chans)
    assert (f.case, f.index) == ("BraTS_001", 2)
    f = classify(Path("/d/PGBM-001_flair.nii.gz"), chans)
    assert (f.case, f.token, f.index) == ("PGBM-001", "flair", None)
    f = classify(Path("/d/PGBM-003/FLAIR_reg.nii.gz"), chans)  # folder per case; "reg" names no channel
    assert (f.case, f.token) == ("PGBM-003", "FLAIR_reg")


# ---- augmentation --------------------------------------------------------------------------------------------


def test_views_share_the_spatial_transform_and_scale_intensity_per_channel():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 1, 24, 24)
    two = torch.cat([base, base * 100.0 + 50.0], dim=1)  # one anatomy, two unrelated intensity scales
    batch = {"image": two, "label": torch.zeros(3, 24, 24, dtype=torch.long)}
    no_intensity = AugmentConfig(brightness=0, contrast=0, gamma=0, noise=0)
    v = make_views(batch, 1, no_intensity, g)["image"]
    assert torch.allclose(v[:, 1], v[:, 0] * 100.0 + 50.0, atol=1e-3)  # same warp on both channels
    v = make_views(batch, 1, AugmentConfig(noise=0), torch.Generator().manual_seed(0))["image"]
    lo0, hi0 = v[:, 0].amin((1, 2)), v[:, 0].amax((1, 2))
    lo1, hi1 = v[:, 1].amin((1, 2)), v[:, 1].amax((1, 2))
    assert float((hi0 - lo0).max()) < 5 and float((hi1 - lo1).min()) > 20  # each channel keeps its own range
    assert not torch.allclose((v[:, 1] - 50) / 100, v[:, 0], atol=1e-2)  # and draws its own contrast/gamma


# ---- the real TCIA data through the CLI ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def brain(shared_data, tmp_path_factory):
    """TCIA ingested with --channels T1post,FLAIR,T2 (2 complete studies of PGBM-001; 2 lack T2)."""
    src = shared_data("tcia_brain_tumor_progression_dicom")
    out = tmp_path_factory.mktemp("brain") / "brain"
    code, stdout, err = _cli(["ingest", str(src), "--out", str(out), "--channels", CH, "--label-series", "Mask",
                              "--label-names", "1=tumour"])
    return code, stdout, err, out, src


def _cli(args: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    from medcl_cli.cli.app import main

    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, o.getvalue(), e.getvalue()


def test_tcia_ingest_one_case_per_study_with_three_channels(brain):
    code, stdout, err, out, src = brain
    assert code == 5, err  # two studies lack a T2 series: refused, the others ingested
    assert "cases: 2 (2 labelled" in stdout
    info = json.loads((out / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "T1post", "1": "FLAIR", "2": "T2"}
    cases = pd.read_csv(out / "cases.csv", dtype=str)
    assert list(cases.columns[:4]) == ["case_id", "image", "image_0001", "image_0002"]
    assert list(cases["case_id"]) == ["case_0001", "case_0002"]
    # traceable: each channel's series number and description, joined in channel order
    assert set(cases["series_description"]) == {"T1post+FLAIR_reg+T2_reg"} and set(cases["modality"]) == {"MR"}
    assert sorted(cases["series_number"]) == ["11+35623+37908", "11+35637+37910"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"case_000{c}_000{k}.nii.gz" for c in (1, 2) for k in range(3)]
    report = pd.read_csv(out / "ingest_report.csv", dtype=str).fillna("")
    refused = report[report["status"] == "failed:missing-channel"]
    assert len(refused) == 2 and all("'T2'" in r and "FLAIR_reg, T1post" in r for r in refused["reason"])
    assert (report["status"] == "ignored:incomplete-study").sum() == 6  # their T1post, FLAIR_reg and mask
    masks = report[(report["description"] == "Mask_Tumor") & (report["status"] == "label")]
    assert sorted(masks["reason"]) == ["label of case_0001", "label of case_0002"]  # the merged case ids
    flair = report[report["description"] == "FLAIR_reg"]
    assert sorted(flair["reason"])[:2] == ["channel 1 (FLAIR) of case_0001", "channel 1 (FLAIR) of case_0002"]
    # the channels are the study's own series, on one grid, with the mask series as label
    imgs = [sitk.ReadImage(str(out / f"images/case_0001_000{k}.nii.gz")) for k in range(3)]
    lab = sitk.ReadImage(str(out / "labels/case_0001.nii.gz"))
    assert all(i.GetSize() == (260, 320, 25) and np.allclose(i.GetOrigin(), imgs[0].GetOrigin()) for i in imgs + [lab])
    arrs = [sitk.GetArrayFromImage(i).astype(np.float64) for i in imgs]
    assert all(np.corrcoef(arrs[0].ravel(), a.ravel())[0, 1] < 0.99 for a in arrs[1:])  # three sequences
    assert set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1}
    single = min((src / "PGBM-001").glob("11-19-1991*/35637-FLAIRreg-*"))
    ref = sitk.GetArrayFromImage(_dicom_volume(single))
    assert np.array_equal(ref, sitk.GetArrayFromImage(imgs[1]))  # the FLAIR voxels, unchanged
    assert _cli(["validate", str(out)])[0] == 0


def _dicom_volume(folder: Path) -> sitk.Image:
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    return r.Execute()


def test_tcia_chain_finetune_evaluate_predict_export(brain, tmp_path):
    _, _, _, data, src = brain
    run = tmp_path / "ft"
    code, _, err = _cli(["finetune", "--data", str(data), "--out", str(run), "--steps", "2", *TINY_NET])
    assert code == 0, err
    assert "input channels: 3 (T1post, FLAIR, T2)" in err
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["channel_names"] == ["T1post", "FLAIR", "T2"] and ck["config"]["model"]["in_channels"] == 3
    code, _, err = _cli(["evaluate", str(run), "--data", str(data), "--split", "all", "--out", str(tmp_path / "ev")])
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "ev" / "metrics_per_case.csv")) == 2

    # three files, given out of order: matched by name; the mask lands on the first channel's grid
    scans = tmp_path / "scans"
    scans.mkdir()
    for k, name in enumerate(("t1post", "flair", "t2")):
        shutil.copy(data / f"images/case_0001_000{k}.nii.gz", scans / f"{name}.nii.gz")
    ref = sitk.ReadImage(str(scans / "t1post.nii.gz"))
    code, _, err = _cli(["predict", str(run), str(scans / "t2.nii.gz"), str(scans / "t1post.nii.gz"),
                              str(scans / "flair.nii.gz"), "--out", str(tmp_path / "p")])
    assert code == 0, err
    side = json.loads((tmp_path / "p" / "scans.json").read_text())
    assert side["channels"] == {ch: str(scans / f) for ch, f in
                                (("T1post", "t1post.nii.gz"), ("FLAIR", "flair.nii.gz"), ("T2", "t2.nii.gz"))}
    assert side["input"] == str(scans / "t1post.nii.gz")  # channel 0's path as given
    mask = sitk.ReadImage(str(tmp_path / "p" / "scans.nii.gz"))
    assert mask.GetSize() == ref.GetSize() and np.allclose(mask.GetDirection(), ref.GetDirection())
    code, _, err = _cli(["predict", str(run), str(scans / "t2.nii.gz"), str(scans / "flair.nii.gz"),
                         "--out", str(tmp_path / "p2")])
    assert code == 2 and "trained on 3 channels (T1post, FLAIR, T2); 2 file(s)" in err
    # a DICOM study folder: its series matched on SeriesDescription as at ingest
    study = min((src / "PGBM-001").iterdir())
    code, _, err = _cli(["predict", str(run), str(study), "--out", str(tmp_path / "pd")])
    assert code == 0, err
    (side_path,) = sorted((tmp_path / "pd").glob("*.json"))
    assert side_path.name == "series_0011_T1post.json"  # named after channel 0's series number and description
    side = json.loads(side_path.read_text())
    assert set(side["channels"]) == {"T1post", "FLAIR", "T2"}
    # the folder as given, with the patient name (PGBM-001 is the PatientName) and the study date scrubbed
    assert side["input"] == str(src / "<redacted>" / study.name.replace("04-02-1992", "<redacted>"))
    assert side["label_map"] == {"0": "background", "1": "tumour"}  # --label-names, carried through training
    # a study without T2 is reported, not segmented with a missing channel
    code, _, err = _cli(["predict", str(run), str(src / "PGBM-003"), "--out", str(tmp_path / "pf")])
    assert code == 3 or code == 5, err
    assert "'T2'" in err

    code, _, err = _cli(["export", str(data), "--format", "nnunet", "--out", str(tmp_path / "raw"), "--dataset-id", "502"])
    assert code == 0, err
    (ds,) = (tmp_path / "raw").iterdir()
    assert json.loads((ds / "dataset.json").read_text())["channel_names"] == {"0": "T1post", "1": "FLAIR", "2": "T2"}
    assert sorted(p.name for p in (ds / "imagesTr").iterdir())[:3] == [f"case_0001_000{k}.nii.gz" for k in range(3)]
    code, _, err = _cli(["export", str(data), "--format", "monai", "--out", str(tmp_path / "mon")])
    assert code == 0, err
    dl = json.loads((tmp_path / "mon" / "datalist.json").read_text())
    item = dl["training"][0]
    assert item["image"] == [f"images/{item['case_id']}_000{k}.nii.gz" for k in range(3)]
    assert all((tmp_path / "mon" / p).is_file() for p in item["image"])

    # --init-from a 3-channel run on a 1-channel dataset: refused, exit 4
    code, _, err = _cli(["ingest", str(src / "PGBM-003"), "--out", str(tmp_path / "one"), "--label-series", "Mask"])
    code, _, err = _cli(["finetune", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "ft1"), "--steps", "1",
                         "--init-from", str(run), *TINY_NET])
    assert code == 4 and "3 input channel(s) (T1post, FLAIR, T2)" in err and "has 1" in err


def test_nifti_channels_by_suffix_and_folder_with_resampling_and_refusal(brain, tmp_path):
    _, _, _, data, _ = brain
    src = tmp_path / "src"
    (src / "PGBM-B").mkdir(parents=True)
    imgs = [sitk.ReadImage(str(data / f"images/case_0001_000{k}.nii.gz")) for k in range(3)]
    for k, name in enumerate(("t1post", "flair", "t2")):  # layout 2: <case>_<name>
        img = imgs[k][20:240, :, :] if name == "t2" else imgs[k]  # T2 cropped: another grid
        sitk.WriteImage(img, str(src / f"PGBM-A_{name}.nii.gz"))
    for k, name in enumerate(("T1post", "FLAIR_reg")):  # layout 3: a folder per case, T2 missing
        sitk.WriteImage(imgs[k], str(src / "PGBM-B" / f"{name}.nii.gz"))
    out = tmp_path / "ds"
    code, _, err = _cli(["ingest", str(src), "--out", str(out), "--channels", CH])
    assert code == 5, err
    cases = pd.read_csv(out / "cases.csv", dtype=str)
    assert list(cases["case_id"]) == ["PGBM-A"]
    report = pd.read_csv(out / "ingest_report.csv", dtype=str).fillna("")
    t2 = report[report["source"].str.endswith("PGBM-A_t2.nii.gz")].iloc[0]
    assert t2["status"] == "ok" and "resampled onto the grid of PGBM-A_t1post.nii.gz" in t2["reason"]
    assert "size (220, 320, 25) vs (260, 320, 25)" in t2["reason"] or "(260, 320, 25)" in t2["reason"]
    miss = report[report["status"] == "failed:missing-channel"].iloc[0]
    assert "PGBM-B" in miss["source"] and "'T2'" in miss["reason"]
    ch2 = sitk.ReadImage(str(out / "images/PGBM-A_0002.nii.gz"))
    assert ch2.GetSize() == imgs[0].GetSize() and np.allclose(ch2.GetOrigin(), imgs[0].GetOrigin())
    a, b = sitk.GetArrayFromImage(ch2), sitk.GetArrayFromImage(imgs[2]).astype(np.float32)
    assert np.allclose(a[:, :, 20:240], b[:, :, 20:240], atol=1e-3) and not a[:, :, :20].any()  # outside: 0
    assert _cli(["validate", str(out)])[0] == 0


def test_ingest_where_no_study_has_every_channel_names_the_series_found(shared_data, tmp_path):
    src = shared_data("tcia_brain_tumor_progression_dicom") / "PGBM-003"
    code, _, err = _cli(["ingest", str(src), "--out", str(tmp_path / "x"), "--channels", CH, "--label-series", "Mask"])
    assert code == 3 and "--channels T1post,FLAIR,T2: no study or case has every channel" in err
    assert "found: FLAIR_reg, T1post" in err
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["ingest_report.csv"]  # the report, written on every exit
