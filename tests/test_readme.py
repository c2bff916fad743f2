"""The README stays true: CI runs exactly its test command, and every page it links exists."""

from __future__ import annotations

import re

from conftest import REPO


def _code_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = _code_blocks(readme)
    assert len(blocks) >= 2, "README must show the install command and the test command"
    install, test_cmd = blocks[0], blocks[1]
    assert "pip install torch==2.13.0" in install and "medcl demo" in install
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    ci_lines = [ln.strip() for ln in ci.splitlines()]
    assert test_cmd in ci_lines, f"CI must run the README's test command: {test_cmd!r}"
    assert "torch==2.13.0" in ci


def test_readme_links_exist():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    missing = [ln for ln in links if not ln.startswith("http") and not (REPO / ln).exists()]
    assert not missing, f"README links to missing files: {missing}"
