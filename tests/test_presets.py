"""The ACDC presets load through the config loader (which refuses unknown keys) with the values they name."""

from __future__ import annotations

from pathlib import Path

import pytest

from medcl_cli.config import load_config, load_method_config

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def test_paper_preset_holds_the_papers_protocol():
    cfg = load_config([TEMPLATES / "acdc_paper.yaml"])
    assert cfg.data.image_size == 256
    assert cfg.train.steps == 30000 and cfg.train.batch_size == 24
    assert cfg.train.labeled_fraction_per_batch == 0.5  # 12 labelled + 12 unlabelled
    assert cfg.train.precision == "auto"
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.schedule, o.poly_power) == ("sgd", 0.01, 0.9, 1e-4, "poly", 0.9)
    assert tuple(cfg.model.channels) == (16, 32, 64, 128, 256)
    a = cfg.arco
    # the paper's ARCO settings where the CPU preset departs from them
    assert a.tau_t == 0.01 and a.labeled_fraction is None
    assert a.global_weight == 1.0 and a.local_weight == 1.0 and a.unsup_mode == "mask" and a.sampler == "sg"
    assert a.rep_dim == 512
    cpu = load_config([TEMPLATES / "acdc_cpu.yaml"]).arco
    assert (cpu.tau_t, cpu.labeled_fraction, cpu.global_weight) != (a.tau_t, a.labeled_fraction, a.global_weight)


@pytest.mark.parametrize("method", ["arco", "pdcr", "gcl", "semicl", "simclr", "supervised"])
def test_paper_preset_over_each_method_template(method):
    """What `benchmarks/acdc.py --preset` and `medcl ... --method M --config` resolve: template < preset."""
    cfg = load_method_config(method, [TEMPLATES / "acdc_paper.yaml"])
    assert cfg.method == method and cfg.optim.name == "sgd" and cfg.data.image_size == 256
    if method == "arco":
        assert cfg.arco.tau_t == 0.01 and cfg.arco.global_weight == 1.0


def test_paper_preset_batch_is_twelve_labelled_and_twelve_unlabelled(tiny_dataset):
    from medcl_cli.data.batches import labeled_patients, make_sampler, mark_labeled
    from medcl_cli.data.dataset import open_slices

    cfg = load_method_config("arco", [TEMPLATES / "acdc_paper.yaml"], ["data.image_size=32"])
    slices = open_slices(tiny_dataset, cfg.data)
    mark_labeled(slices, labeled_patients(slices, "2", 0))
    mix = cfg.arco.labeled_fraction if cfg.arco.labeled_fraction is not None else cfg.train.labeled_fraction_per_batch
    sampler = make_sampler(slices, {"labeled", "unlabeled"}, cfg.train.batch_size, mix, 0, 0, 1, 0, 1)
    assert list(sampler.counts) == [12, 12]
