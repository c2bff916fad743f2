"""The U-Net: shapes and stage contract of NetOut, norms, odd sizes, 3D by argument, UAFS insertion."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from medcl_cli.config import ModelConfig
from medcl_cli.errors import UsageError
from medcl_cli.models.unet import NetOut, UNet, build_unet


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_forward_returns_logits_and_stages(norm):
    torch.manual_seed(0)
    net = UNet(2, 1, 4, channels=(8, 16, 32), norm=norm, dropout=0.1)
    out = net(torch.randn(2, 1, 32, 32))
    assert isinstance(out, NetOut)
    assert out.logits.shape == (2, 4, 32, 32)
    assert [t.shape[1] for t in out.enc] == [8, 16, 32]
    assert [t.shape[-1] for t in out.enc] == [32, 16, 8]
    assert [t.shape[1] for t in out.dec] == [16, 8]
    assert out.dec[-1].shape[-2:] == (32, 32)
    assert net.stage_channels == {"enc0": 8, "enc1": 16, "enc2": 32, "dec0": 16, "dec1": 8}
    out.logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_odd_size_and_3d():
    net = UNet(2, 1, 3, channels=(4, 8, 16))
    assert net(torch.randn(1, 1, 37, 45)).logits.shape == (1, 3, 37, 45)
    net3 = UNet(3, 1, 2, channels=(4, 8))
    out = net3(torch.randn(1, 1, 8, 16, 16))
    assert out.logits.shape == (1, 2, 8, 16, 16) and out.enc[-1].shape == (1, 8, 4, 8, 8)


def test_build_from_config_and_errors():
    net = build_unet(ModelConfig(channels=(8, 16)), 3)
    assert net.head.out_channels == 3
    with pytest.raises(UsageError):
        UNet(2, 1, 2, norm="layer")
    with pytest.raises(UsageError):
        UNet(2, 1, 2, channels=(8, 16), uafs_at=("dec7",))


@pytest.mark.skipif(importlib.util.find_spec("medcl_cli.models.uafs") is None, reason="UAFS not written yet")
def test_uafs_inserted_after_named_stage():
    net = UNet(2, 1, 2, channels=(8, 16, 32), uafs_at=("dec1",))
    assert "dec1" in net.uafs
    assert net(torch.randn(2, 1, 32, 32)).logits.shape == (2, 2, 32, 32)
