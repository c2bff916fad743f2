"""CUDA paths of the engine, on a GPU only (marker `cuda`, skipped without one; benchmarks/gpu_check.sh
runs them with `-m cuda`): the real fit loop in fp16 (GradScaler) and bf16 autocast for every registered
method, channels-last tensors inside the network, a one-process nccl run through the torchrun code path,
and `medcl predict` on CUDA against the CPU on the input's own grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import volumes as V
from test_conformance import method_config
from test_ingest_phi import cli

from medcl_cli.engine import checkpoint as ckpt_io
from medcl_cli.methods import REGISTRY, get_info

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash benchmarks/gpu_check.sh)"),
]

# every registered method in its first stage, plus ARCO's fine-tuning stage (another code path)
RUNS = [(k, get_info(k).stages[0]) for k in sorted(REGISTRY)] + [("arco", "finetune")]


def _fit(key: str, stage: str, data: Path, out: Path, dist=None, **sets: object):
    from medcl_cli.engine import distributed as D
    from medcl_cli.engine.loop import FitRequest, fit

    cfg = method_config(key, **{"train.device": "cuda", "train.checkpoint_every": 100, **sets})
    req = FitRequest(cfg=cfg, stage=stage, data=data, out=out, labeled="2", dist=dist or D.DistEnv())
    return cfg, fit(req)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("key,stage", RUNS, ids=[f"{k}-{s}" for k, s in RUNS])
def test_amp_steps_of_every_method(key, stage, precision, tiny_dataset, tmp_path):
    from medcl_cli.models.unet import build_unet

    cfg, res = _fit(key, stage, tiny_dataset, tmp_path / "run", **{"train.steps": 6, "train.precision": precision})
    assert res.steps == 6 and all(np.isfinite(v) for v in res.last_losses.values()), res.last_losses
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["precision"] == {"fp16": "float16", "bf16": "bfloat16"}[precision]
    assert info["device"].startswith("cuda")
    state = ckpt_io.load(tmp_path / "run" / "checkpoints" / "last.pt")
    if precision == "fp16":  # the GradScaler ran (its state is saved only when enabled)
        assert state["scaler"].get("scale", 0) > 0, state["scaler"]
    else:
        assert not state["scaler"], "bf16 needs no GradScaler"
    torch.manual_seed(cfg.train.seed)  # build_method's initial weights
    start = build_unet(cfg.model, 4)
    changed = [n for n, p in start.named_parameters() if not torch.equal(p, state["model"][n].cpu())]
    assert changed, "no network parameter changed in 6 AMP steps"


@pytest.mark.parametrize("key,stage", [("supervised", "finetune"), ("arco", "finetune"), ("gcl", "pretrain")])
def test_channels_last_tensors_reach_the_network(key, stage, tiny_dataset, tmp_path, monkeypatch):
    from medcl_cli.engine import loop

    seen: list[tuple[str, tuple[int, ...], bool]] = []
    real = loop.build_method

    def build_and_watch(*args, **kwargs):
        method, info = real(*args, **kwargs)
        for name, mod in method.net.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.register_forward_pre_hook(
                    lambda m, inp, name=name: seen.append(
                        (name, tuple(inp[0].shape), inp[0].is_contiguous(memory_format=torch.channels_last))
                    )
                )
        return method, info

    monkeypatch.setattr(loop, "build_method", build_and_watch)
    _fit(key, stage, tiny_dataset, tmp_path / "run", **{"train.steps": 1})
    wide = [s for s in seen if s[1][1] > 1 and s[1][0] > 1]  # 1 channel or 1 row: both layouts at once
    assert wide, "no convolution ran"
    bad = sorted({name for name, _, ok in wide if not ok})
    assert not bad, f"convolutions fed a non-channels-last tensor: {bad[:8]}"


def test_one_process_nccl_run_through_the_torchrun_path(tiny_dataset, tmp_path, monkeypatch):
    import torch.distributed as dist

    from medcl_cli.engine import distributed as D

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(D.free_port()))
    env = D.env_from_torchrun()
    assert env.launched and env.enabled and env.world == 1
    try:
        for key, stage in (("supervised", "finetune"), ("arco", "pretrain")):
            _, res = _fit(key, stage, tiny_dataset, tmp_path / key, dist=env, **{"train.steps": 2})
            assert dist.is_initialized() and dist.get_backend() == "nccl"
            assert np.isfinite(res.last_losses["loss"])
            assert res.best is not None  # validation ran on rank 0 and its best Dice was broadcast (nccl)
            state = ckpt_io.load(tmp_path / key / "checkpoints" / "last.pt")
            assert len(state["rng_ranks"]) == 1  # the generators were gathered over the group
            assert json.loads((tmp_path / key / "run.json").read_text())["world_size"] == 1
    finally:
        D.shutdown()
    assert not dist.is_initialized()


def test_predict_on_cuda_matches_cpu_on_the_input_grid(tmp_path, capsys):
    run = V.write_run(tmp_path / "run")
    img, lab = V.blob_volume((70, 58, 9), seed=11)
    image = V.oblique_image(img)
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(scan))
    image = sitk.ReadImage(str(scan))  # the grid as stored (NIfTI keeps the direction in float32)
    masks = {}
    for device in ("cpu", "cuda"):
        res = cli(capsys, "predict", str(run), str(scan), "--out", str(tmp_path / device), "--device", device)
        assert res.exit_code == 0, res.stderr
        out = sitk.ReadImage(str(tmp_path / device / "scan.nii.gz"))
        assert out.GetSize() == image.GetSize()
        assert np.allclose(out.GetSpacing(), image.GetSpacing()) and np.allclose(out.GetOrigin(), image.GetOrigin())
        assert np.allclose(out.GetDirection(), image.GetDirection())
        masks[device] = sitk.GetArrayFromImage(out)
    differ = float((masks["cpu"] != masks["cuda"]).mean())
    assert differ <= 0.005, f"{differ:.2%} of the voxels differ between the CPU and the CUDA prediction"
    assert V.dice(masks["cuda"] > 0, lab > 0) > 0.8
