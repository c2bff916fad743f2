"""ingest -> finetune -> evaluate -> predict on four real ACDC volumes, tiny budget (a wiring test, not a score)."""

from __future__ import annotations

import json

import pandas as pd

import volumes as V
from medcl_cli.data.io import read_image

TRAIN = ["patient041_frame01", "patient041_frame02", "patient090_frame01"]  # the smallest ACDC volumes
VAL = ["patient087_frame01"]


def test_finetune_evaluate_predict_on_acdc(shared_data, tmp_path, capsys):
    acdc = shared_data("acdc")
    split = tmp_path / "split.csv"
    split.write_text("case_id,split\n" + "".join(f"{c},train\n" for c in TRAIN) + "".join(f"{c},val\n" for c in VAL))
    images = [str(acdc / "images" / f"{c}.nii.gz") for c in TRAIN + VAL]
    ds, run = tmp_path / "ds", tmp_path / "run"
    code, _, err = V.run_cli(capsys, "ingest", *images, "--labels", str(acdc / "labels"), "--split-file", str(split),
                             "--label-names", "0=background,1=RV,2=Myo,3=LV", "--out", str(ds), "--workers", "1")
    assert code == 0, err
    code, _, err = V.run_cli(capsys, "finetune", "--data", str(ds), "--out", str(run), "--steps", "4", "--image-size",
                             "32", "--batch-size", "4", "--set", "model.channels=[8,16]", "--set", "train.val_every=0",
                             "--device", "cpu", "--labeled", "all")
    assert code == 0, err
    code, out, err = V.run_cli(capsys, "evaluate", str(run), "--data", str(ds), "--split", "val", "--overlays")
    assert code == 0, err
    per_case = pd.read_csv(run / "eval_val" / "metrics_per_case.csv")
    assert sorted(per_case["label"]) == ["LV", "Myo", "RV"] and list(per_case["case_id"].unique()) == VAL
    assert per_case["dice"].between(0, 1).all() and per_case["iou"].between(0, 1).all()
    assert (per_case["hd95_mm"] >= 0).all() and per_case[["dice", "hd95_mm", "nsd"]].notna().all().all()
    assert per_case["nsd"].between(0, 1).all()
    summ = pd.read_csv(run / "eval_val" / "metrics_summary.csv")
    assert set(summ["label"]) == {"RV", "Myo", "LV", "mean_foreground"}
    assert json.loads((run / "eval_val" / "summary.json").read_text())["n_cases"] == 1
    assert (run / "eval_val" / "overlays" / f"{VAL[0]}.png").is_file()
    assert "mean_foreground" in out
    src = acdc / "images" / f"{VAL[0]}.nii.gz"
    code, _, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "preds"))
    assert code == 0, err
    pred, inp = read_image(tmp_path / "preds" / f"{VAL[0]}.nii.gz"), read_image(src)
    assert pred.GetSize() == inp.GetSize() and pred.GetSpacing() == inp.GetSpacing()
    assert pred.GetOrigin() == inp.GetOrigin() and pred.GetDirection() == inp.GetDirection()
    side = json.loads((tmp_path / "preds" / f"{VAL[0]}.json").read_text())
    assert side["label_map"] == {"0": "background", "1": "RV", "2": "Myo", "3": "LV"}
