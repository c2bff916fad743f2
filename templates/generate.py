"""Regenerate `templates/default.yaml` from the dataclasses in `medcl_cli/config.py`.

The dataclasses are the one home of defaults; each field's trailing `# comment` in config.py becomes the
comment in the YAML. Method templates (`gcl.yaml`, ...) are written by hand with the papers' values;
`tests/test_config.py` fails when any template drifts from the dataclasses.

    python -m medcl_cli.templates.generate            # rewrite default.yaml
    python -m medcl_cli.templates.generate --check    # exit 1 when a file would change
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

import yaml

from medcl_cli import config as C

HERE = Path(__file__).resolve().parent


def _field_comments() -> dict[str, dict[str, str]]:
    """{class name: {field: trailing comment}} read from config.py's source."""
    src = inspect.getsource(C)
    lines = src.splitlines()
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.ClassDef):
            fields: dict[str, str] = {}
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    line = lines[stmt.end_lineno - 1] if stmt.end_lineno else ""
                    if "#" in line:
                        fields[stmt.target.id] = line.split("#", 1)[1].strip()
            out[node.name] = fields
    return out


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _section(name: str, obj: Any, comments: dict[str, dict[str, str]]) -> list[str]:
    cls = type(obj)
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"# {doc[0]}" if doc else f"# {name}", f"{name}:"]
    for f in dataclasses.fields(obj):
        value = C.to_dict(getattr(obj, f.name))
        comment = comments.get(cls.__name__, {}).get(f.name, "")
        line = f"  {f.name}: {_scalar(value)}"
        lines.append(f"{line:<44} # {comment}" if comment else line)
    return lines


def render(sections: list[str], header: str) -> str:
    cfg = C.Config()
    comments = _field_comments()
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name in sections:
        out += [""] + _section(name, getattr(cfg, name), comments)
    return "\n".join(out) + "\n"


def targets() -> dict[Path, str]:
    from medcl_cli.methods import REGISTRY

    general = [f.name for f in dataclasses.fields(C.Config) if f.name != "method" and f.name not in REGISTRY]
    files = {
        HERE / "default.yaml": render(
            general,
            "medcl defaults (a commented copy of medcl_cli/config.py; regenerate with\n"
            "`python -m medcl_cli.templates.generate`). Use a copy with --config FILE, or --set key=value.",
        )
    }
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = []
    for path, text in targets().items():
        old = path.read_text() if path.exists() else None
        if old != text:
            changed.append(path.name)
            if not check:
                path.write_text(text)
    if check and changed:
        print("out of date: " + ", ".join(changed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
