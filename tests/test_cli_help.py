"""Every registered command documents itself: an `Example:` line in its --help, and a docs/cli page that
equals what the app renders now (docs/gen_cli_docs.py), so the pages cannot drift from the code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medcl_cli.cli.app import app
from medcl_cli.cli.commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "docs" / "gen_cli_docs.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_cli_docs"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_command_is_registered_once() -> None:
    names = [n for n, _, _ in COMMANDS]
    assert len(names) == len(set(names))
    registered = [c.name for c in app.registered_commands]
    assert registered == names


@pytest.mark.parametrize("name", [n for n, _, _ in COMMANDS])
def test_help_has_an_example_line(name: str) -> None:
    res = CliRunner().invoke(app, [name, "--help"], prog_name="medcl", terminal_width=100)
    assert res.exit_code == 0, res.output
    lines = [ln.strip() for ln in res.stdout.splitlines()]
    examples = [ln for ln in lines if ln.startswith("Example")]
    assert examples, f"`medcl {name} --help` has no 'Example:' line"
    assert any(f"medcl {name}" in ln for ln in examples), f"the example of {name} does not run `medcl {name}`"


def test_cli_pages_match_the_app() -> None:
    gen = _gen()
    stale = gen.stale_pages()
    assert not stale, f"docs/cli pages out of date: {stale}; regenerate with: python docs/gen_cli_docs.py"


def test_stale_page_is_detected(tmp_path: Path) -> None:
    gen = _gen()
    gen.write_pages(tmp_path)
    assert gen.stale_pages(tmp_path) == []
    page = tmp_path / "export.md"
    page.write_text(page.read_text().replace("--dataset-id", "--dataset-number"))
    (tmp_path / "gone.md").write_text("# an old command\n")
    assert gen.stale_pages(tmp_path) == ["export.md", "gone.md"]


def test_info_shows_each_method_with_its_stages_data_and_template() -> None:
    import json

    from medcl_cli.methods import REGISTRY

    res = CliRunner().invoke(app, ["info", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data["methods"]) == set(REGISTRY)
    for key, m in data["methods"].items():
        assert m["stages"] == list(REGISTRY[key].stages) and m["needs"] == REGISTRY[key].needs
        assert [u.split()[1] for u in m["usage"]] == m["stages"]
        if m["template"] is not None:
            assert Path(m["template"]).is_file() and Path(m["template"]).stem == key
    for name, t in data["template_details"].items():
        assert Path(t["path"]).is_file() and t["description"]
    text = CliRunner().invoke(app, ["info"]).stdout
    assert "medcl pretrain --method gcl" in text and "templates (copy one" in text
