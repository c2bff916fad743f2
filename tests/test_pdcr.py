"""pdcr method: wiring of the PDCR terms, receptive fields, config errors, template, pretrain refusal."""

from __future__ import annotations

import importlib.resources

import pytest
import torch
from torch import nn

from medcl_cli import config as C
from medcl_cli.core.protocol import DataSpec
from medcl_cli.errors import UsageError
from medcl_cli.methods import get_info
from medcl_cli.methods.losses.patch_contrast import affinity_contrast
from medcl_cli.methods.pdcr import PDCR, unet_receptive_fields
from medcl_cli.models.uafs import UAFS
from medcl_cli.models.unet import UNet, build_unet

CHANNELS = (4, 8, 16, 32)  # stages enc0..enc3, dec0..dec2


def _cfg(**pdcr: object) -> C.Config:
    return C.from_dict({"pdcr": pdcr})


def _batch(b: int = 2, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    label = torch.zeros(b, size, size, dtype=torch.long)
    for i in range(b):
        cy, cx = torch.randint(8, size - 8, (2,), generator=g).tolist()
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        label[i][r2 < 40] = 1
        label[i][r2 < 10] = 2
    label[:, :, :2] = -1  # e.g. outside a warped view: ignored by the loss, background for the ratios
    image = label.clamp(min=0).float()[:, None] + 0.3 * torch.randn(b, 1, size, size, generator=g)
    return {"image": image, "label": label, "labeled": torch.ones(b, dtype=torch.bool)}


def _method(cfg: C.Config | None = None, uafs: tuple[str, ...] = ("dec0", "dec1", "dec2")) -> PDCR:
    torch.manual_seed(0)
    net = UNet(2, 1, 3, channels=CHANNELS, uafs_at=uafs)
    return PDCR(net, cfg or C.Config(), DataSpec(num_classes=3))


def test_training_step_sums_the_weighted_terms_and_trains_every_part():
    method = _method()
    losses = method.training_step(_batch())
    assert set(losses) == {"loss", "dice", "ce", "pdcr_enc", "pdcr_dec", "pdcr_cross"}
    assert all(torch.isfinite(v) for v in losses.values())
    seg = losses["dice"] + losses["ce"]
    expected = seg + 0.1 * losses["pdcr_enc"] + 0.01 * losses["pdcr_dec"] + 0.01 * losses["pdcr_cross"]
    torch.testing.assert_close(losses["loss"].detach(), expected)
    assert all(v.abs() > 0 for k, v in losses.items() if k.startswith("pdcr"))
    losses["loss"].backward()
    for name, p in method.named_parameters():
        assert p.grad is not None, name
    assert any(p.grad.abs().sum() > 0 for p in method.adjust.parameters())
    uafs = [m for m in method.net.modules() if isinstance(m, UAFS)]
    assert len(uafs) == 3 and all(m.branch[0].weight.grad.abs().sum() > 0 for m in uafs)


def test_sampled_vectors_and_ratios_are_the_ones_at_the_mapped_centres():
    method = _method()
    batch = _batch(b=2, size=32)
    out = method.net(batch["image"])
    feat = out.enc[2]  # 8 x 8, stride 4
    vectors, rho = method._sample("enc2", feat, batch["label"], 16)
    idx, centres, _ = method._grid("enc2", feat.shape[2:], batch["label"].shape[1:], 16, feat.device)
    assert vectors.shape == (2, idx.numel(), 16) and rho.shape == (2, 3, idx.numel(), 2)
    ys, xs = torch.unravel_index(idx, (8, 8))
    for n in range(idx.numel()):
        y, x = int(ys[n]), int(xs[n])
        assert 1 <= y <= 6 and 1 <= x <= 6  # away from the border
        assert centres[n].tolist() == [4 * y + 2, 4 * x + 2]  # receptive-field centre of the feature pixel
        torch.testing.assert_close(vectors[:, n], feat[:, :, y, x])
        for p, k in enumerate((5, 7, 9)):
            cy, cx, r = 4 * y + 2, 4 * x + 2, k // 2
            crop = batch["label"][:, max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1]
            for cls in (1, 2):
                ref = (crop == cls).flatten(1).sum(1).float() / k**2
                torch.testing.assert_close(rho[:, p, n, cls - 1], ref)
    # and the encoder term is the mean over stages of the per-patch-size affinity losses
    manual = []
    for s, f in (("enc2", out.enc[2]), ("enc3", out.enc[3])):
        v, r = method._sample(s, f, batch["label"], 64)
        manual.append(torch.stack([affinity_contrast(v, r[:, p], tau=0.5) for p in range(3)]).mean())
    torch.testing.assert_close(method._layer_term(("enc2", "enc3"), {"enc2": out.enc[2], "enc3": out.enc[3]},
                                                  batch["label"], 64), torch.stack(manual).mean())


def test_only_labelled_slices_enter_the_loss():
    method = _method()
    batch = _batch(b=3)
    part = dict(batch, labeled=torch.tensor([True, False, True]))
    part["label"] = batch["label"].clone()
    part["label"][1] = -1  # an unlabelled slice carries no mask
    torch.manual_seed(1)
    got = method.training_step(part)
    keep = [0, 2]
    only = {"image": batch["image"][keep], "label": batch["label"][keep], "labeled": torch.ones(2, dtype=torch.bool)}
    torch.manual_seed(1)
    ref = method.training_step(only)
    torch.testing.assert_close(got["loss"], ref["loss"])
    none = method.training_step(dict(part, labeled=torch.zeros(3, dtype=torch.bool)))
    assert none["loss"].item() == 0.0
    none["loss"].backward()
    assert all(p.grad is not None for p in method.parameters())


def test_sample_counts_are_bounded():
    method = _method(_cfg(enc_samples=9, dec_samples=4, cross_samples=5))
    label = torch.zeros(1, 64, 64, dtype=torch.long)
    for name, size in (("enc2", 16), ("dec1", 16)):
        idx, _, _ = method._grid(name, torch.Size([size, size]), label.shape[1:], 9, torch.device("cpu"))
        assert 1 <= idx.numel() <= 9


def test_average_and_receptive_field_variants():
    avg = _method(_cfg(combine="average"))
    batch = _batch()
    out = avg.net(batch["image"])
    _, rho = avg._sample("enc2", out.enc[2], batch["label"], 16)
    assert rho.shape[1] == 1
    assert torch.isfinite(avg.training_step(batch)["loss"])
    rf = _method(_cfg(patches="rf"))
    _, _, sides = rf._grid("enc3", torch.Size([4, 4]), torch.Size([32, 32]), 16, torch.device("cpu"))
    assert sides.unique().tolist() == [unet_receptive_fields(4)["enc3"]] == [68]
    assert torch.isfinite(rf.training_step(batch)["loss"])


def test_receptive_fields_match_a_gradient_probe():
    torch.manual_seed(0)
    net = UNet(2, 1, 2, channels=(2, 3, 3, 3)).double().eval()
    net.pool = nn.AvgPool2d(2)  # same field as max-pool, but the gradient reaches every pixel of it
    size = 128
    x = torch.randn(1, 1, size, size, dtype=torch.float64).expand(4, -1, -1, -1).clone().requires_grad_(True)
    out = net(x)  # eval mode: the 4 copies are independent, copy k probes position centre + k
    feats = {f"enc{i}": f for i, f in enumerate(out.enc)} | {f"dec{j}": f for j, f in enumerate(out.dec)}
    expected = unet_receptive_fields(4)
    for name, f in feats.items():  # decoder fields alternate with the position: check their mean
        c = f.shape[2] // 2
        probe = sum(f[k, :, c + k, c + k].sum() for k in range(4))
        (grad,) = torch.autograd.grad(probe, x, retain_graph=True)
        extents = []
        for k in range(4):
            rows = grad[k, 0].abs().sum(1).nonzero().flatten()
            extents.append(rows.max().item() - rows.min().item() + 1)
        assert sum(extents) / 4 == expected[name], (name, extents)
        if name.startswith("enc"):
            assert set(extents) == {expected[name]}, (name, extents)


def test_config_errors_name_the_problem():
    with pytest.raises(UsageError, match="enc9"):
        _method(_cfg(enc_stages=["enc9"]))
    with pytest.raises(UsageError, match="cross_stages"):
        _method(_cfg(cross_stages=["enc2"]))
    with pytest.raises(UsageError, match="patch_sizes"):
        _method(_cfg(patch_sizes=[4, 6]))
    with pytest.raises(UsageError, match="combine"):
        _method(_cfg(combine="mean"))


def test_template_turns_uafs_on_and_pretrain_is_refused():
    text = importlib.resources.files("medcl_cli.templates").joinpath("pdcr.yaml").read_text()
    import yaml

    cfg = C.from_dict(yaml.safe_load(text))
    assert cfg.method == "pdcr" and cfg.pdcr == C.PDCRConfig()
    net = build_unet(cfg.model, 4)
    assert sorted(net.uafs) == ["dec0", "dec1", "dec2"]
    assert get_info("pdcr", "finetune").stages == ("finetune",)
    with pytest.raises(UsageError) as exc:
        get_info("pdcr", "pretrain")
    assert "fine-tuning" in exc.value.message and "medcl finetune --method pdcr" in exc.value.hint


def test_cli_refuses_pdcr_pretraining_and_names_the_finetune_command(tiny_dataset, tmp_path, capsys):
    from medcl_cli.cli.app import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--method", "pdcr", "--data", str(tiny_dataset), "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "fine-tuning" in err and "medcl finetune --method pdcr" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_cli_finetune_pdcr_writes_a_run(tiny_dataset, tmp_path):
    import importlib.resources as R
    import subprocess
    import sys

    tpl = str(R.files("medcl_cli.templates").joinpath("pdcr.yaml"))
    out = tmp_path / "run"
    args = ["finetune", "--method", "pdcr", "--config", tpl, "--data", str(tiny_dataset), "--labeled", "2",
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--image-size", "32", "--device", "cpu",
            "--set", "model.channels=[4,8,16,32,64]", "--set", "train.val_every=0"]
    res = subprocess.run([sys.executable, "-m", "medcl_cli", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "checkpoints" / "last.pt").is_file()
    assert "pdcr_enc" in (out / "metrics.csv").read_text()
