"""--resume: a run stopped by SIGTERM mid-way flushes last.pt, exits 130 (Interrupted), and the resumed
run reaches exactly the weights of an uninterrupted --deterministic CPU run (same data order, same
augmentations, same RNG), with metrics.csv continuing where it stopped."""

from __future__ import annotations

import json
import os
import signal

import pandas as pd
import pytest
import torch

from medcl_cli.config import load_config
from medcl_cli.engine import checkpoint
from medcl_cli.engine.loop import FitRequest, fit
from medcl_cli.errors import EXIT_INTERRUPTED, Interrupted
from medcl_cli.core.report import NullReporter


class KillAt(NullReporter):
    """Sends SIGTERM to this process when the loop reports step `at` (the real signal path)."""

    def __init__(self, at: int) -> None:
        self.at, self.n = at, 0

    def advance(self, task: str, n: int = 1, **fields: object) -> None:
        self.n += n
        if self.n == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def _cfg(steps: int):
    sets = {
        "data.image_size": 32, "train.batch_size": 4, "model.channels": "[8,16,32]", "train.device": "cpu",
        "train.steps": steps, "train.val_every": 2, "train.checkpoint_every": 100, "train.deterministic": True,
        "train.log_every": 1, "model.dropout": 0.1, "train.seed": 7,
    }
    return load_config(sets=[f"{k}={v}" for k, v in sets.items()])


def test_interrupted_then_resumed_equals_uninterrupted(tiny_dataset, tmp_path):
    full = tmp_path / "full"
    fit(FitRequest(cfg=_cfg(6), stage="finetune", data=tiny_dataset, out=full))
    run = tmp_path / "cut"
    with pytest.raises(Interrupted) as exc:
        fit(FitRequest(cfg=_cfg(6), stage="finetune", data=tiny_dataset, out=run), KillAt(3))
    assert exc.value.exit_code == EXIT_INTERRUPTED == 130
    assert "--resume" in exc.value.hint
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["exit_code"] == 130
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))

    res = fit(FitRequest(cfg=_cfg(6), stage="finetune", data=tiny_dataset, out=run, resume=True))
    assert res.steps == 6
    a = checkpoint.load(full / "checkpoints" / "last.pt")
    b = checkpoint.load(run / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["best_metric"] == b["best_metric"]
    ma, mb = pd.read_csv(full / "metrics.csv"), pd.read_csv(run / "metrics.csv")
    assert len(ma) == len(mb) and (ma.step.to_numpy() == mb.step.to_numpy()).all()
    clock = mb.split == "time"  # seconds since the run began (wall, training): they differ between runs
    assert (ma.split == "time").eq(clock).all() and abs(ma.value - mb.value)[~clock].max() < 1e-5
    wall = mb[mb.metric == "wall_s"]
    assert list(wall.step) == [2, 4, 6] and wall.value.is_monotonic_increasing  # continues across the resume
    assert json.loads((run / "run.json").read_text())["resumed"][0]["at_step"] == 3


def test_resume_needs_last_checkpoint(tiny_dataset, tmp_path):
    from medcl_cli.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError):
        fit(FitRequest(cfg=_cfg(2), stage="finetune", data=tiny_dataset, out=tmp_path / "none", resume=True))
