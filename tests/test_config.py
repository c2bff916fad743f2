"""Config: defaults in dataclasses, YAML + --set overrides, did-you-mean on unknown keys, templates in sync."""

from __future__ import annotations

import dataclasses
import importlib.resources

import pytest
import yaml

from medcl_cli import config as C
from medcl_cli.errors import UsageError
from medcl_cli.methods import REGISTRY

METHOD_SECTIONS = set(REGISTRY)
GENERAL_SECTIONS = [f.name for f in dataclasses.fields(C.Config) if f.name not in METHOD_SECTIONS and f.name != "method"]


def test_set_overrides_nested_and_typed():
    cfg = C.load_config(sets=["train.steps=12", "optim.lr=0.5", "model.channels=[8,16,32]", "train.deterministic=true"])
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 0.5
    assert cfg.model.channels == (8, 16, 32)
    assert cfg.train.deterministic is True
    # untouched values stay at their defaults
    assert cfg.train.batch_size == C.TrainConfig().batch_size


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(UsageError) as exc:
        C.load_config(sets=["train.stesp=3"])
    assert "did you mean 'steps'" in exc.value.message
    with pytest.raises(UsageError) as exc:
        C.load_config(sets=["trian.steps=3"])
    assert "did you mean 'train'" in exc.value.message


def test_wrong_types_are_usage_errors():
    for bad in ("train.steps=abc", "train.steps=1.5", "train.deterministic=maybe", "optim.lr=[1]"):
        with pytest.raises(UsageError):
            C.load_config(sets=[bad])
    with pytest.raises(UsageError):
        C.load_config(sets=["novalue"])


def test_precedence_file_then_set_then_flags(tmp_path):
    f1 = tmp_path / "a.yaml"
    f1.write_text("train:\n  steps: 5\n  batch_size: 3\noptim:\n  lr: 0.1\n")
    f2 = tmp_path / "b.yaml"
    f2.write_text("train:\n  steps: 6\n")
    cfg = C.load_config(files=[f1, f2], sets=["optim.lr=0.2"], overrides={"train": {"batch_size": 9}})
    assert (cfg.train.steps, cfg.optim.lr, cfg.train.batch_size) == (6, 0.2, 9)
    assert C.with_overrides(cfg, {"train.steps": None, "optim.lr": 0.3}).optim.lr == 0.3


def test_yaml_round_trip_is_exact():
    cfg = C.load_config(sets=["train.steps=7", "model.uafs_at=[dec1]"])
    again = C.from_dict(yaml.safe_load(C.dump_yaml(cfg)))
    assert again == cfg


def test_config_file_errors(tmp_path):
    from medcl_cli.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError):
        C.load_config(files=[tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UsageError):
        C.load_config(files=[bad])
    # safe_load only: a python object tag is refused, not executed
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UsageError):
        C.load_config(files=[evil])


def _template(name: str) -> dict:
    text = importlib.resources.files("medcl_cli.templates").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def test_default_template_is_a_commented_copy_of_the_defaults():
    tpl = _template("default")
    defaults = C.to_dict(C.Config())
    expected = _flatten({s: defaults[s] for s in GENERAL_SECTIONS})
    got = _flatten({s: tpl.get(s, {}) for s in GENERAL_SECTIONS})
    assert got == expected, "templates/default.yaml drifted from config.py"
    text = importlib.resources.files("medcl_cli.templates").joinpath("default.yaml").read_text()
    assert text.count("#") >= len(expected) // 2, "templates/default.yaml should comment its keys"


@pytest.mark.parametrize("method", sorted(METHOD_SECTIONS - {"supervised"}))
def test_method_template_matches_its_section(method):
    tpl = _template(method)
    assert tpl.get("method") == method
    defaults = C.to_dict(C.Config())
    assert _flatten(tpl.get(method, {})) == _flatten(defaults[method]), f"templates/{method}.yaml drifted"
    # anything else the template sets (e.g. model.uafs_at for pdcr) must be a valid override
    C.from_dict({k: v for k, v in tpl.items()})


def test_default_template_is_generated_from_config():
    from medcl_cli.templates import generate

    assert generate.main(["--check"]) == 0, "run: python -m medcl_cli.templates.generate"


def test_method_template_is_the_base_of_its_method():
    tpl = _template("pdcr")
    cfg = C.load_method_config("pdcr")
    assert cfg.method == "pdcr"
    assert list(cfg.model.uafs_at) == list(tpl["model"]["uafs_at"]) and cfg.model.uafs_at, "pdcr turns UAFS on"
    # --set wins over the template, and another method does not inherit pdcr's network change
    assert C.load_method_config("pdcr", sets=["model.uafs_at=[]"]).model.uafs_at == ()
    assert C.load_method_config("supervised").model.uafs_at == ()
    # the method may also come from a config file
    assert C.load_method_config(None, sets=["method=pdcr"]).model.uafs_at == cfg.model.uafs_at
