"""`medcl evaluate`: files and columns, scores of a real (tiny) trained run, skips and clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import volumes as V
from medcl_cli.evaluate import metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    run = V.write_run(root / "run")
    data = V.write_dataset(
        root / "data", {"c0": "train", "c1": "val", "c2": "val", "c3": "val", "c4": "test"}, unlabelled=("c3",)
    )
    return run, data


def test_evaluate_writes_per_case_summary_and_overlays(setup, capsys):
    run, data = setup
    code, out, err = V.run_cli(capsys, "evaluate", str(run), "--data", str(data), "--split", "val", "--overlays",
                               "--report")
    assert code == 0, err
    folder = run / "eval_val"
    per_case = pd.read_csv(folder / "metrics_per_case.csv")
    assert list(per_case.columns) == metrics.PER_CASE_COLUMNS
    assert sorted(per_case["case_id"]) == ["c1", "c2"]  # c3 has no label: skipped with a note
    assert "no label" in err and "c3" in err
    assert per_case["dice"].between(0.9, 1.0).all()  # the tiny run really segments the blob
    assert (per_case["hd95_mm"] >= 0).all() and not per_case["pred_empty"].any()
    assert per_case["nsd"].between(0.5, 1.0).all()  # most surface voxels within 1 mm of the reference
    assert (per_case["vol_ref_ml"] > 0).all()
    summ = pd.read_csv(folder / "metrics_summary.csv")
    assert set(summ["label"]) == {"blob", metrics.OVERALL}
    assert (summ["n"] == 2).all() and (summ["n_nan"] == 0).all()
    js = json.loads((folder / "summary.json").read_text())
    assert js["n_cases"] == 2 and js["split"] == "val" and js["skipped_unlabelled"] == ["c3"]
    assert js["metrics"]["blob"]["dice"]["mean"] == pytest.approx(per_case["dice"].mean())
    assert (folder / "overlays" / "c1.png").stat().st_size > 1000
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert js["report"] == "report.html" and page.count("<h3>") == 2 and "c1" in page and "c2" in page
    assert "blob" in out and "mean_foreground" in out  # the summary table on stdout
    # a second run into the same folder refuses, --overwrite replaces
    code, _, err = V.run_cli(capsys, "evaluate", str(run), "--data", str(data), "--split", "val")
    assert code == 6 and "--overwrite" in err
    code, out, _ = V.run_cli(capsys, "evaluate", str(run), "--data", str(data), "--split", "test", "--json",
                             "--out", str(run / "ev_test"))
    assert code == 0 and json.loads(out)["n_cases"] == 1


def test_evaluate_clear_errors(setup, tmp_path, capsys):
    run, data = setup
    (tmp_path / "norun").mkdir()
    code, _, err = V.run_cli(capsys, "evaluate", str(tmp_path / "norun"), "--data", str(data))
    assert code == 3 and "no checkpoint" in err and "Traceback" not in err
    only_val = V.write_dataset(tmp_path / "d2", {"a": "val"})
    code, _, err = V.run_cli(capsys, "evaluate", str(run), "--data", str(only_val), "--split", "test")
    assert code == 3 and "no 'test' cases" in err and "val (1 cases)" in err
    other = V.write_dataset(tmp_path / "d3", {"a": "val"}, labels={"0": "background", "1": "liver"})
    code, _, err = V.run_cli(capsys, "evaluate", str(run), "--data", str(other), "--split", "val")
    assert code == 4 and "label map" in err and "liver" in err
