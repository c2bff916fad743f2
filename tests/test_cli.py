"""The CLI shell: help without torch, version, error lines and exit codes."""

from __future__ import annotations

import subprocess
import sys

from medcl_cli import __version__


def run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medcl_cli", *args], capture_output=True, text=True, env=env)


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv=['medcl','--help']\n"
        "from medcl_cli.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'medcl --help imported torch'\n"
        "assert 'monai' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "ingest" in res.stdout or "info" in res.stdout


def test_version():
    res = run("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"medcl {__version__}"


def test_unknown_command_is_usage_error():
    res = run("frobnicate")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr


def test_medcl_error_prints_error_and_hint_without_traceback(monkeypatch):
    from medcl_cli.cli import app as appmod
    from medcl_cli.errors import InvalidDataError

    import typer

    def boom() -> None:
        raise InvalidDataError("case_0003: label grid differs from image", "re-export the mask on the image grid")

    sub = typer.Typer()
    sub.command()(boom)
    monkeypatch.setattr(appmod, "app", sub)
    import pytest

    with pytest.raises(SystemExit) as exc:
        appmod.main([])
    assert exc.value.code == 4


def test_error_lines_on_stderr(tmp_path):
    code = (
        "import typer\n"
        "from medcl_cli.cli import app as a\n"
        "from medcl_cli.errors import OutputError\n"
        "t = typer.Typer()\n"
        "@t.command()\n"
        "def x():\n    raise OutputError('out exists: /tmp/x', 'pass --overwrite')\n"
        "a.app = t\n"
        "a.main([])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 6
    assert "error: out exists: /tmp/x" in res.stderr
    assert "hint: pass --overwrite" in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""


def test_internal_error_is_short_and_exit_1():
    code = (
        "import typer\n"
        "from medcl_cli.cli import app as a\n"
        "t = typer.Typer()\n"
        "@t.command()\n"
        "def x():\n    secret = 'PATIENT-NAME-XYZ'\n    raise ValueError('bad thing')\n"
        "a.app = t\n"
        "a.main([])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 1
    assert "internal error: ValueError: bad thing" in res.stderr
    assert "Traceback" not in res.stderr
    assert "PATIENT-NAME-XYZ" not in res.stderr  # no locals, ever


def test_info_json_lists_methods():
    import json

    res = run("info", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["version"] == __version__
    assert "supervised" in data["methods"]
    assert "default" in data["templates"]


def test_pretrain_next_hint_carries_method_and_labels():
    from pathlib import Path

    from medcl_cli.engine.training import finetune_hint

    run_dir, data = Path("runs/pre"), Path("data")
    hint = finetune_hint("arco", data, run_dir, "splits/labeled_3.txt")  # arco has its own fine-tuning stage
    assert hint == ("medcl finetune --data data --init-from runs/pre --method arco --labeled splits/labeled_3.txt "
                    "--out runs/pre-ft")
    hint = finetune_hint("gcl", data, run_dir, None)  # self-supervised: supervised fine-tuning on every mask
    assert hint == "medcl finetune --data data --init-from runs/pre --out runs/pre-ft"
