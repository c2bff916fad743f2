"""The fit loop and the pretrain/finetune commands: run folder contents, refusal to overwrite, learning,
best/last checkpoints usable by load_network, --init-from, non-finite loss detection, LR schedule."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from medcl_cli.cli.app import main
from medcl_cli.config import OptimConfig, load_config
from medcl_cli.engine import checkpoint
from medcl_cli.engine.loop import FitRequest, fit
from medcl_cli.engine.optim import lr_at
from medcl_cli.errors import MedclError
from medcl_cli.core.report import ListReporter

TINY = ["--image-size", "32", "--batch-size", "4", "--device", "cpu", "--set", "model.channels=[8,16,32]"]


def medcl(*args: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return int(exc.value.code or 0)


def tiny_cfg(**sets: object):
    base = {"data.image_size": 32, "train.batch_size": 4, "model.channels": "[8,16,32]", "train.device": "cpu"}
    base.update(sets)
    return load_config(sets=[f"{k}={v}" for k, v in base.items()])


def test_finetune_command_writes_a_complete_run(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "ft"
    code = medcl("finetune", "--data", str(tiny_dataset), "--out", str(out), "--steps", "6", "--lr", "3e-3",
                 "--set", "train.val_every=3", "--set", "train.log_every=1", "--labeled", "2", *TINY)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert cap.out.strip() == str(out)  # stdout carries the result only
    assert "device: cpu" in cap.err and "next: medcl evaluate" in cap.err
    for name in ("run.json", "config.yaml", "metrics.csv", "events.jsonl", "log.txt", "curves.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["exit_code"] == 0 and info["steps_done"] == 6
    assert info["seed"] == 0 and info["device"] == "cpu" and len(info["labeled_patients"]) == 2
    assert info["dataset"]["fingerprint"] and info["versions"]["torch"]
    assert info["best"]["metric"] == "val_dice" and 0 <= info["best"]["value"] <= 1
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns) == ["step", "split", "metric", "value"]
    assert {"loss", "dice", "ce", "lr"} <= set(m[m.split == "train"].metric)
    assert set(m[m.split == "val"].step) == {3, 6}
    net, ck = checkpoint.load_network(out, "cpu")
    assert ck["step"] in (3, 6) and ck["label_map"]["3"] == "lv_cavity" and net.out_channels == 4
    assert ck["preprocessing"] == {"image_size": 32, "resize": "resize", "normalize": "zscore"}
    last = checkpoint.load(out / "checkpoints" / "last.pt")
    assert last["step"] == 6 and "optimizer" in last and "rng" in last
    # a non-empty --out is refused (exit 6) unless --overwrite
    assert medcl("finetune", "--data", str(tiny_dataset), "--out", str(out), "--steps", "1", *TINY) == 6
    assert medcl("finetune", "--data", str(tiny_dataset), "--out", str(out), "--steps", "1", "--overwrite",
                 "--set", "train.val_every=0", *TINY) == 0
    assert json.loads((out / "run.json").read_text())["steps_done"] == 1


def test_supervised_learns_on_synthetic_data(tiny_dataset, tmp_path):
    cfg = tiny_cfg(**{"train.steps": 40, "train.val_every": 0, "optim.lr": 0.01, "train.log_every": 1,
                      "train.batch_size": 8, "augment.rotate_deg": 5})
    res = fit(FitRequest(cfg=cfg, stage="finetune", data=tiny_dataset, out=tmp_path / "r"))
    m = pd.read_csv(tmp_path / "r" / "metrics.csv")
    loss = m[(m.split == "train") & (m.metric == "loss")].value.to_numpy()
    assert loss[-5:].mean() < 0.8 * loss[:5].mean(), loss
    assert res.best is not None and res.best > 0.3, res.best


def test_init_from_loads_matching_weights_and_reports(tiny_dataset, tmp_path):
    cfg = tiny_cfg(**{"train.steps": 1, "train.val_every": 0})
    fit(FitRequest(cfg=cfg, stage="finetune", data=tiny_dataset, out=tmp_path / "a"))
    src = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    rep = ListReporter()
    cfg0 = tiny_cfg(**{"train.steps": 1, "train.val_every": 0, "optim.lr": 1e-12, "train.seed": 5})
    fit(FitRequest(cfg=cfg0, stage="finetune", data=tiny_dataset, out=tmp_path / "b", init_from=tmp_path / "a"), rep)
    assert any("loaded" in msg and f"/{len(src)} tensors" in msg for _, msg in rep.lines), rep.lines
    got = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    w = "encoder.0.0.weight"
    assert torch.allclose(got[w], src[w], atol=1e-6)


def test_non_finite_loss_is_named(tiny_dataset, tmp_path, monkeypatch):
    from medcl_cli.engine import setup
    from medcl_cli.methods.supervised import Supervised

    class Exploding(Supervised):
        calls = 0

        def training_step(self, batch):
            out = super().training_step(batch)
            Exploding.calls += 1
            if Exploding.calls == 3:
                out["ce"] = out["ce"] * float("nan")
                out["loss"] = out["loss"] * float("inf")
            return out

    monkeypatch.setattr(setup, "load_method_class", lambda key: Exploding)
    cfg = tiny_cfg(**{"train.steps": 5, "train.val_every": 0})
    with pytest.raises(MedclError, match=r"non-finite loss at step 3 \(loss=inf, dice=.*, ce=nan\)"):
        fit(FitRequest(cfg=cfg, stage="finetune", data=tiny_dataset, out=tmp_path / "x"))
    assert json.loads((tmp_path / "x" / "run.json").read_text())["status"] == "failed"


def test_usage_errors(tiny_dataset, tmp_path, capsys):
    assert medcl("pretrain", "--data", str(tiny_dataset), "--out", str(tmp_path / "p"), "--method", "supervised") == 2
    assert "fine-tuning objective" in capsys.readouterr().err
    assert medcl("finetune", "--data", str(tiny_dataset), "--out", str(tmp_path / "q"), "--method", "supervsed") == 2
    assert "did you mean 'supervised'" in capsys.readouterr().err
    assert medcl("finetune", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "q"), *TINY) == 3
    assert not (tmp_path / "q").exists()  # a run that never started leaves nothing behind
    assert medcl("finetune", "--data", str(tiny_dataset), "--out", str(tmp_path / "q"), "--device", "cuda:3") == 2


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10)
    assert lr_at(0, 110, cos) == pytest.approx(0.1) and lr_at(9, 110, cos) == pytest.approx(1.0)
    assert lr_at(60, 110, cos) == pytest.approx(0.5) and lr_at(110, 110, cos) == pytest.approx(0.0, abs=1e-9)
    poly = OptimConfig(lr=1.0, schedule="poly", poly_power=0.9)
    assert lr_at(50, 100, poly) == pytest.approx(0.5**0.9)
    assert lr_at(50, 100, OptimConfig(lr=0.3, schedule="constant")) == 0.3
    assert not math.isnan(lr_at(0, 1, cos))


def test_resume_command_extends_a_run_with_its_labelled_set(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "r"
    assert medcl("finetune", "--data", str(tiny_dataset), "--out", str(out), "--steps", "2", "--labeled", "1",
                 "--set", "train.val_every=0", *TINY) == 0
    first = json.loads((out / "run.json").read_text())
    assert medcl("finetune", "--resume", str(out), "--steps", "3") == 0
    info = json.loads((out / "run.json").read_text())
    assert info["steps_done"] == 3 and info["resumed"][0]["at_step"] == 2
    assert info["labeled_patients"] == first["labeled_patients"] and len(first["labeled_patients"]) == 1
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 3


def test_evaluate_hint_names_a_split_that_has_cases(tiny_dataset, tmp_path):
    """After fine-tuning, the printed `medcl evaluate` names the held-out split there is; a dataset with no
    val or test case (one patient) is pointed at its training cases, not at an empty split."""
    import shutil

    import pandas as pd

    from medcl_cli.engine.training import evaluate_hint

    assert evaluate_hint(tmp_path / "ft", tiny_dataset).endswith(f"--data {tiny_dataset} --split val --report")
    one = tmp_path / "one"
    shutil.copytree(tiny_dataset, one, ignore=shutil.ignore_patterns(".cache*", "cache*"))
    cases = pd.read_csv(one / "cases.csv", keep_default_na=False)
    cases["split"] = "train"
    cases.to_csv(one / "cases.csv", index=False)
    assert evaluate_hint(tmp_path / "ft", one).endswith("--split train --report")
