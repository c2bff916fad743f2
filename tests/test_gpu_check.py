"""benchmarks/gpu_check.sh: refuses to start without CUDA; `--dry-run` runs the same path on the CPU
(the CUDA tests skip, arco pretrain + fine-tune on synthetic data) and prints the three numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
NUMBERS = ("iterations_per_second", "val_dice", "peak_gpu_memory_mb")


def _run(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable)  # the script runs `python` from PATH unless PYTHON is set
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_dry_run_takes_the_whole_path_and_prints_the_three_numbers(tmp_path):
    out = tmp_path / "out"
    res = _run(tmp_path, "--dry-run", "--out", str(out))  # from another folder: the script finds its checkout
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    found = dict(re.findall(rf"^({'|'.join(NUMBERS)}): ([0-9.]+)", res.stdout, re.MULTILINE))
    assert set(found) == set(NUMBERS), res.stdout[-2000:]
    assert float(found["iterations_per_second"]) > 0 and 0.0 <= float(found["val_dice"]) <= 1.0
    if not torch.cuda.is_available():
        assert re.search(r"\d+ skipped", res.stdout), "the CUDA tests are collected and skip on the CPU"
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] and result["device"] == "cpu" and 1 <= result["steps_per_stage"] <= 2
    assert [s["stage"] for s in result["stages"]] == ["pretrain", "finetune"]
    ft = json.loads((out / "finetune" / "run.json").read_text())
    assert ft["method"] == "arco" and ft["init_from"] == str(out / "pretrain") and len(ft["labeled_patients"]) == 3
    cfg = (out / "finetune" / "config.yaml").read_text()
    assert "sampler: sg" in cfg and "name: sgd" in cfg and "schedule: poly" in cfg  # the paper preset


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_start_without_cuda(tmp_path):
    res = _run(tmp_path, "--out", str(tmp_path / "out"), timeout=120)
    assert res.returncode == 2
    assert "error: no CUDA GPU is visible to torch" in res.stderr and "--dry-run" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_acdc_is_found_beside_the_checkout_or_through_the_environment(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("MEDCL_SHARED_DATA", raising=False)
    assert mod.find_acdc(None) == REPO.parent / "shared" / "data" / "acdc"
    monkeypatch.setenv("MEDCL_SHARED_DATA", str(tmp_path))
    assert mod.find_acdc(None) == tmp_path / "acdc"
    assert mod.find_acdc(tmp_path / "mine") == tmp_path / "mine"
    # the budget: both stages' fixed costs and steps fit what is left, with a 5 % margin
    probes = [{"fixed_s": 10.0, "s_per_step": 0.25}, {"fixed_s": 20.0, "s_per_step": 0.25}]
    assert mod.plan_steps(300.0, probes) == 510  # (300 x 0.95 - 30 s) / 0.5 s per step of both stages
    assert mod.plan_steps(20.0, probes) == 1  # never zero steps
