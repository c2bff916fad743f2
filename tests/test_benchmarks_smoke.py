"""Smoke runs of benchmarks/acdc.py and benchmarks/predict.py on 3 ACDC volumes with tiny budgets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = {"patient041_frame01": "train", "patient041_frame02": "train", "patient087_frame01": "val"}
TINY = ["--set", "train.steps=2", "--set", "data.image_size=32", "--set", "model.channels=[8,16]",
        "--set", "train.batch_size=4"]


def mini_acdc(acdc: Path, root: Path) -> Path:
    """An ACDC-shaped folder of symlinks to three real volumes (no copies of the shared data)."""
    for sub in ("images", "labels", "splits"):
        (root / sub).mkdir(parents=True)
    for c in CASES:
        for sub in ("images", "labels"):
            (root / sub / f"{c}.nii.gz").symlink_to(acdc / sub / f"{c}.nii.gz")
    info = pd.read_csv(acdc / "info.csv")
    info[info["case_id"].isin(list(CASES))].to_csv(root / "info.csv", index=False)
    pd.DataFrame({"case_id": list(CASES), "split": list(CASES.values())}).to_csv(root / "splits.csv", index=False)
    (root / "splits" / "labeled_1.txt").write_text("patient041\n")
    return root


@pytest.mark.slow
def test_acdc_runner_smoke(shared_data, tmp_path):
    acdc = mini_acdc(shared_data("acdc"), tmp_path / "acdc")
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "acdc.py"), "--acdc", str(acdc), "--out", str(out), "--labeled", "1",
         "--methods", "supervised,simclr", "--device", "cpu", "--eval-data", str(out / "dataset"), *TINY],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"supervised", "simclr"} and not results["failed"]
    assert rows["simclr"]["pretrain"]["seconds"] > 0 and "pretrain" not in rows["supervised"]
    assert rows["simclr"]["pretrain"].get("shared")  # self-supervised: one pretraining for all label counts
    for r in rows.values():
        assert 0 <= r["val"]["dice_mean"] <= 1 and r["val"]["n_cases"] == 1
        assert r["other"]["n_cases"] == 3 and r["finetune"]["peak_mb"] > 50
    assert "| simclr | 1 |" in res.stdout and (out / "results.md").is_file()

    # a variant row: reuse that pretraining, every patient labelled, tagged name
    again = tmp_path / "again"
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "acdc.py"), "--acdc", str(acdc), "--out", str(again), "--labeled",
         "all", "--methods", "simclr", "--device", "cpu", "--data", str(out / "dataset"), "--pretrain-from", str(out),
         "--tag=-re", *TINY],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    (row,) = json.loads((again / "results.json").read_text())["rows"]
    assert row["method"] == "simclr-re" and row["labeled"] == "all"
    assert row["pretrain"]["reused"] == str(out / "simclr" / "pretrain") and not (again / "simclr" / "pretrain").exists()
    log = (again / "simclr" / "labeled_all" / "logs" / "finetune.log").read_text()
    assert "--labeled all" in log and f"--init-from {out / 'simclr' / 'pretrain'}" in log
    assert "| simclr-re | all |" in res.stdout and "reused" in res.stdout


@pytest.mark.slow
def test_predict_benchmark_smoke(shared_data, tmp_path):
    import volumes as V

    run = V.write_run(tmp_path / "run")  # a tiny trained 2-class run: timing only, the classes do not matter
    acdc = shared_data("acdc")
    files = [str(acdc / "images" / f"{c}.nii.gz") for c in ("patient041_frame01", "patient090_frame01")]
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "predict.py"), "--run", str(run), "--inputs", *files,
                          "--repeats", "1", "--device", "cpu", "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    js = json.loads((out / "results.json").read_text())
    assert js["volumes"] == 2 and set(js["predict"]["per_volume"]) == {Path(f).name for f in files}
    assert js["median_ratio_predict_to_forward"] > 0  # one repeat on a shared CPU: no ordering is reliable
    assert js["predict"]["peak_rss_mb"] > 0 and js["cli"]["total_seconds"] > 0
    assert "| forward passes only |" in res.stdout


def test_acdc_runner_refuses_a_bad_label_count(tmp_path):
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "acdc.py"), "--out", str(tmp_path / "b"), "--labeled", "3,few"],
        capture_output=True, text=True,
    )
    assert res.returncode != 0 and "--labeled: 'few' is neither a label count nor all" in res.stderr
    assert "Traceback" not in res.stderr


def test_speed_runner_measures_both_arco_stages(tmp_path):
    """`arco:finetune` builds the second stage (its representation head, not the pretraining heads); an
    unknown stage is refused by name; supervised is the reference row."""
    out = tmp_path / "speed"
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--methods", "arco,arco:finetune,arco:nope",
         "--steps", "1", "--warmup", "0", "--image-size", "32", "--no-interleave", "--device", "cpu",
         "--out", str(out), "--data-root", str(tmp_path / "data")],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads((out / "results.json").read_text())["methods"]
    assert rows["arco"]["step_s"] > 0 and rows["arco:finetune"]["step_s"] > 0 and rows["supervised"]["step_s"] > 0
    assert rows["arco:finetune"]["n_params"] != rows["arco"]["n_params"]  # different heads: a different stage
    assert "has no stage 'nope'" in rows["arco:nope"]["error"]


@pytest.mark.slow
def test_acdc_runner_learning_curves_and_resume(shared_data, tmp_path):
    """--curve N: a val Dice point every N steps (with wall seconds) per stage in results.json and a
    curves.png per method; --resume after a finished run keeps every stage, and a stage killed after a
    checkpoint is continued (`medcl ... --resume`), not restarted."""
    acdc = mini_acdc(shared_data("acdc"), tmp_path / "acdc")
    out = tmp_path / "bench"
    tiny = [t.replace("train.steps=2", "train.steps=4") for t in TINY] + ["--set", "train.checkpoint_every=2"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "acdc.py"), "--acdc", str(acdc), "--out", str(out), "--labeled",
           "1", "--methods", "arco", "--device", "cpu", "--curve", "2", *tiny]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    curve = row["curve"]
    for stage in ("pretrain", "finetune"):  # arco validates in both stages
        assert [p["step"] for p in curve[stage]] == [2, 4], curve
        assert all(0 <= p["val_dice"] <= 1 and p["wall_s"] > 0 and 0 < p["train_s"] <= p["wall_s"] for p in curve[stage])
        assert curve[stage][1]["wall_s"] > curve[stage][0]["wall_s"]
    assert curve["pretrain_totals"]["step"] == 4 and curve["pretrain_totals"]["wall_s"] >= curve["pretrain"][-1]["wall_s"]
    png = out / "arco" / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = {k: row[k]["seconds"] for k in ("pretrain", "finetune", "evaluate")}
    # benchmarks/curves.py: the same points from the run folders, one figure and a table
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "curves.py"), str(out), "--out",
                          str(tmp_path / "all.png")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "| arco | 1 | pretrain | 4 |" in res.stdout and "| arco | 1 | finetune | 8 |" in res.stdout  # after its 4 steps
    assert (tmp_path / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a finished benchmark resumed: every stage kept (same timings, nothing run again)
    ft = out / "arco" / "labeled_1" / "finetune"
    stamp = (ft / "run.json").stat().st_mtime_ns
    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert {k: row[k]["seconds"] for k in first} == first and (ft / "run.json").stat().st_mtime_ns == stamp
    assert [p["step"] for p in row["curve"]["finetune"]] == [2, 4]



@pytest.mark.slow
def test_acdc_runner_resumes_a_killed_stage(shared_data, tmp_path):
    """SIGTERM to the runner reaches the running stage, which saves last.pt and stops (exit 130); the same
    command with --resume continues that stage from its checkpoint and completes the curve."""
    acdc = mini_acdc(shared_data("acdc"), tmp_path / "acdc")
    out = tmp_path / "bench"
    tiny = [t.replace("train.steps=2", "train.steps=400") for t in TINY] + ["--set", "train.checkpoint_every=2"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "acdc.py"), "--acdc", str(acdc), "--out", str(out), "--labeled",
           "1", "--methods", "supervised", "--device", "cpu", "--curve", "100", *tiny]
    ft = out / "supervised" / "labeled_1" / "finetune"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (ft / "checkpoints" / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in err
    info = json.loads((ft / "run.json").read_text())
    assert info["status"] == "interrupted" and 2 <= info["steps_done"] < 400 and info["wall_s"] > 0
    assert "interrupted" in json.loads((out / "results.json").read_text())

    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout
    info = json.loads((ft / "run.json").read_text())
    assert info["status"] == "completed" and info["steps_done"] == 400
    assert [r["at_step"] for r in info["resumed"]] == [info["resumed"][0]["at_step"]] and info["resumed"][0]["at_step"] >= 2
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["finetune"]["resumed"] and [p["step"] for p in row["curve"]["finetune"]] == [100, 200, 300, 400]
    walls = [p["wall_s"] for p in row["curve"]["finetune"]]
    assert walls == sorted(walls)  # wall seconds continue across the resume
    assert "finetune --resume" in (ft.parent / "logs" / "finetune.log").read_text()


@pytest.mark.slow
def test_speed_runner_times_every_method_in_fp32_and_bf16_side_by_side(tmp_path):
    """--precision fp32,bf16: both precisions of each method in the one interleaved loop, with the ratio;
    on a CPU without native bf16 the runner refuses bf16 by name instead."""
    from medcl_cli.engine.device import cpu_bf16_supported

    out = tmp_path / "speed"
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--methods", "supervised,simclr", "--steps", "1",
         "--warmup", "0", "--image-size", "32", "--precision", "fp32,bf16", "--device", "cpu", "--out", str(out),
         "--data-root", str(tmp_path / "data")],
        capture_output=True, text=True,
    )
    if not cpu_bf16_supported():
        assert res.returncode != 0 and "--precision bf16" in res.stderr and "native bf16" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    js = json.loads((out / "results.json").read_text())
    assert js["precisions"] == ["fp32", "bf16"]
    for key in ("supervised", "simclr", "basicunet"):
        r = js["methods"][key]
        assert set(r["precision_step_s"]) == {"fp32", "bf16"} and all(v > 0 for v in r["precision_step_s"].values())
        assert r["precision_ratio"]["fp32"] == 1.0
        assert r["precision_ratio"]["bf16"] == pytest.approx(r["precision_step_s"]["bf16"] / r["step_s"])
    assert "| method | fp32 s / step | bf16 s / step | bf16 / fp32 |" in res.stdout
