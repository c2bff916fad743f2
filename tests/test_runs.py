"""`medcl runs`: finds run folders recursively and reads what the engine and `medcl evaluate` really write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcl_cli.cli.app import main
from medcl_cli.errors import InputNotFoundError
from medcl_cli.catalog.run_index import find_runs, table_lines

TINY = ["--image-size", "32", "--batch-size", "4", "--device", "cpu", "--set", "model.channels=[8,16,32]"]


def medcl(*args: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return int(exc.value.code or 0)



def test_runs_lists_a_real_finetune_run_with_its_evaluation(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    ft = root / "ft" / "labelled2"
    assert medcl("finetune", "--data", str(tiny_dataset), "--out", str(ft), "--steps", "3", "--labeled", "2",
                 "--set", "train.val_every=3", *TINY) == 0
    assert medcl("evaluate", str(ft), "--data", str(tiny_dataset), "--split", "val", "--device", "cpu") == 0
    # a failed run and a damaged run.json beside it; a hidden temp folder is ignored
    (root / "broken").mkdir()
    (root / "broken" / "run.json").write_text("{not json")
    (root / "failed").mkdir()
    (root / "failed" / "run.json").write_text(json.dumps({
        "stage": "pretrain", "method": "gcl", "status": "failed", "exit_code": 4, "error": "bad meta",
        "started": "2020-01-01T00:00:00+00:00", "ended": "2020-01-01T00:01:05+00:00", "labeled_patients": []}))
    (root / ".tmp-x").mkdir()
    (root / ".tmp-x" / "run.json").write_text("{}")
    capsys.readouterr()

    rows = {r.path: r for r in find_runs(root)}
    assert sorted(rows) == ["broken", "failed", "ft/labelled2"]
    info = json.loads((ft / "run.json").read_text())
    real = rows["ft/labelled2"]
    assert (real.stage, real.method, real.status, real.labeled) == ("finetune", "supervised", "completed", 2)
    assert real.best_dice == pytest.approx(info["best"]["value"]) and real.steps == 3
    assert real.duration_s == pytest.approx(info["timings"]["total_s"])
    summary = json.loads((ft / "eval_val" / "summary.json").read_text())
    assert real.eval_dice == {"val": pytest.approx(summary["metrics"]["mean_foreground"]["dice"]["mean"])}
    assert real.dataset == info["dataset"]["name"]
    assert rows["failed"].status == "failed" and rows["failed"].duration_s == 65 and rows["failed"].labeled == 0
    assert rows["broken"].status == "unreadable" and rows["broken"].error

    assert medcl("runs", str(root), "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in listed] == ["broken", "failed", "ft/labelled2"]  # by start time (unknown first)
    assert medcl("runs", str(root)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["run", "stage", "method", "dataset"]
    line = next(x for x in out if x.startswith("ft/labelled2"))
    assert "supervised" in line and f"{real.best_dice:.3f}" in line and "val=" in line and "completed" in line
    assert table_lines([])[0].startswith("run")


def test_runs_missing_folder_exits_3(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError):
        find_runs(tmp_path / "nope")
    assert medcl("runs", str(tmp_path / "nope")) == 3
