"""Checkpoints: atomic round trip, network rebuilt from the stored config, clear errors for truncated,
corrupted and pickle-carrying files (the malicious payload must never run)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from medcl_cli.config import Config, ModelConfig, to_dict
from medcl_cli.engine import checkpoint
from medcl_cli.errors import InputNotFoundError, InvalidDataError
from medcl_cli.models.unet import build_unet


def _state(net) -> dict:
    cfg = Config(model=ModelConfig(channels=(4, 8)))
    return {
        "format": checkpoint.FORMAT,
        "method": "supervised",
        "stage": "finetune",
        "model": net.state_dict(),
        "config": to_dict(cfg),
        "label_map": {"0": "background", "1": "a", "2": "b"},
        "rng": checkpoint.rng_state(),
        "step": 3,
    }


@pytest.fixture()
def run_dir(tmp_path):
    torch.manual_seed(0)
    net = build_unet(ModelConfig(channels=(4, 8)), 3)
    checkpoint.save(tmp_path / "run" / "checkpoints" / "last.pt", _state(net))
    return tmp_path / "run", net


def test_round_trip_and_load_network(run_dir):
    run, net = run_dir
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    net2, ckpt = checkpoint.load_network(run, "cpu")
    assert ckpt["step"] == 3 and not net2.training
    x = torch.randn(2, 1, 16, 16)
    net.eval()
    assert torch.equal(net(x).logits, net2(x).logits)


def test_rng_state_round_trip(run_dir):
    run, _ = run_dir
    ckpt = checkpoint.load(run / "checkpoints" / "last.pt")
    checkpoint.set_rng_state(ckpt["rng"])
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    checkpoint.set_rng_state(ckpt["rng"])
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_truncated_and_garbage_files(run_dir, tmp_path):
    run, _ = run_dir
    data = (run / "checkpoints" / "last.pt").read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidDataError, match="truncated or corrupted"):
        checkpoint.load(bad)
    junk = tmp_path / "junk.pt"
    rng = np.random.default_rng(0)
    for size in (1, 8, 100, 1000, 5000):  # random bytes of many sizes: each reader path of torch.load
        for _ in range(20):
            junk.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
            with pytest.raises(InvalidDataError):
                checkpoint.load(junk)
    with pytest.raises(InputNotFoundError):
        checkpoint.load_network(tmp_path / "nothing")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": {}, "payload": _Evil()}, evil)
    with pytest.raises(InvalidDataError, match="pickled Python object"):
        checkpoint.load(evil)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(InvalidDataError):
        checkpoint.load(raw)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_load_matching_reports_loaded_and_skipped():
    a = build_unet(ModelConfig(channels=(4, 8)), 3)
    b = build_unet(ModelConfig(channels=(4, 8)), 5)
    loaded, skipped = checkpoint.load_matching(b, a.state_dict())
    assert "head.weight" in skipped and "head.bias" in skipped
    assert "encoder.0.0.weight" in loaded
    assert torch.equal(b.encoder[0][0].weight, a.encoder[0][0].weight)
