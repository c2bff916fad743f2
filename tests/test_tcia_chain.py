"""The README chain on the real TCIA brain-tumour DICOM folder, default methods and labels, tiny budget:
ingest -> pretrain gcl -> finetune -> evaluate -> predict. Cardiac defaults (GCL's `phase`) must not be
needed, a pretraining-only run must be refused, and the training data's profile must reach the run."""

from __future__ import annotations

import json

import pytest
import torch

import volumes as V
from medcl_cli.engine.eta import WallEstimate, format_seconds

TINY = ["--image-size", "32", "--batch-size", "4", "--set", "model.channels=[8,16]", "--device", "cpu"]


@pytest.fixture(scope="module")
def tcia_data(shared_data, tmp_path_factory):
    """The whole TCIA folder (10 cases of 3 patients, 320 x 260 x ~24) ingested as README step 1 does."""
    from medcl_cli.cli.app import main

    ds = tmp_path_factory.mktemp("tcia") / "data"
    with pytest.raises(SystemExit) as done:
        main(["ingest", str(shared_data("tcia_brain_tumor_progression_dicom")), "--out", str(ds), "--label-series",
              "Mask", "--workers", "1"])
    assert done.value.code in (0, None)
    return ds


@pytest.mark.parametrize("stage,method", [("pretrain", "simclr"), ("pretrain", "semicl"), ("pretrain", "arco"),
                                          ("finetune", "pdcr"), ("finetune", "arco")])
def test_every_method_runs_with_its_defaults_on_tcia(tcia_data, tmp_path, capsys, stage, method):
    code, _, err = V.run_cli(capsys, stage, "--data", str(tcia_data), "--method", method, "--out", str(tmp_path / "r"),
                             "--steps", "2", "--image-size", "32", "--batch-size", "4", "--device", "cpu")
    assert code == 0, err


def test_readme_chain_on_tcia_brain_dicom(tcia_data, shared_data, tmp_path, capsys):
    tcia = shared_data("tcia_brain_tumor_progression_dicom")
    ds, gcl, ft = tcia_data, tmp_path / "gcl", tmp_path / "ft"
    code, _, err = V.run_cli(capsys, "pretrain", "--data", str(ds), "--method", "gcl", "--out", str(gcl), "--steps", "12",
                             *TINY, "--set", "gcl.topk=8")
    assert code == 0, err
    assert "gcl meta labels (auto): patient, slice_part" in err  # no cardiac phase here, and no error about it
    assert err.count("estimate: about") == 1 and "for 12 steps" in err  # once, after the first timed steps
    code, _, err = V.run_cli(capsys, "predict", str(gcl), str(ds / "images"), "--out", str(tmp_path / "no"))
    assert code == 4 and f"--init-from {gcl}" in err, err
    code, _, err = V.run_cli(capsys, "finetune", "--data", str(ds), "--init-from", str(gcl), "--out", str(ft),
                             "--steps", "4", *TINY, "--set", "train.val_every=0")
    assert code == 0, err
    info = json.loads((ft / "run.json").read_text())
    prof = info["data_profile"]
    assert info["segmentation_trained"] is True and prof["modality"] == "MR" and prof["n_channels"] == 1
    assert prof["spacing_mm"]["min"][0] == pytest.approx(0.6875) and prof["intensity"][0]["p99"] > 0
    assert torch.load(ft / "checkpoints" / "last.pt", weights_only=True)["data_profile"] == prof
    assert json.loads((gcl / "run.json").read_text())["segmentation_trained"] is False
    code, out, err = V.run_cli(capsys, "evaluate", str(ft), "--data", str(ds), "--split", "val", "--strict")
    assert code == 0 and "mean_foreground" in out, err
    series = next(p for p in tcia.rglob("*T1post*") if p.is_dir())  # a DICOM series folder, as a user gives it
    code, out, err = V.run_cli(capsys, "predict", str(ft), str(series), "--out", str(tmp_path / "preds"), "--strict")
    assert code == 0 and "1 written" in out, err
    side = json.loads(next((tmp_path / "preds").glob("*.json")).read_text())
    assert side["modality"] == "MR" and "fit_warnings" not in side


def test_wall_estimate_once_after_the_window_from_the_second_step():
    eta = WallEstimate(start=0, total=1000, window=10)
    lines = [eta.observe(step, now=2.0 + 0.5 * step) for step in range(1, 30)]  # 0.5 s per step
    shown = [(i + 1, line) for i, line in enumerate(lines) if line]
    assert len(shown) == 1 and shown[0][0] == 11
    assert "about 8 min for 1000 steps" in shown[0][1] and "0.5 s/step over steps 2-11" in shown[0][1]
    assert all(WallEstimate(0, 11).observe(s, now=float(s)) is None for s in range(1, 12))  # too short to estimate
    resumed = WallEstimate(start=500, total=1000)
    assert [resumed.observe(s, now=float(s)) for s in range(501, 512)][-1].startswith("estimate: about 17 min")
    assert [format_seconds(s) for s in (0.2, 40, 700, 3 * 3600 + 300)] == ["1 s", "40 s", "12 min", "3 h 05 min"]
