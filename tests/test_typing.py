"""House style: medcl_cli is typed and mypy clean. Runs mypy (dev extra) on the package; skipped where
mypy is not installed (the CI test extra), so the check runs on developer machines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_medcl_cli_is_mypy_clean() -> None:
    pytest.importorskip("mypy", reason="mypy is in the dev extra (pip install -e '.[dev]'); not installed here")
    # config from pyproject.toml [tool.mypy]; the incremental cache (.mypy_cache, git-ignored) makes
    # repeated runs take about a second instead of ~20 s cold
    cmd = [sys.executable, "-m", "mypy", "medcl_cli"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mypy found errors:\n{done.stdout}{done.stderr}"
    assert "Success" in done.stdout
