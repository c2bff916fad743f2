"""The layout rules of docs/architecture.md, checked on the source: one package per command, no import
circles, imports that point one way, one name per module, no unexplained long module."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "medcl_cli"
TOP_LEVEL_MODULES = {"__init__", "__main__", "config", "errors"}
LONG = 330  # "~300 lines": past this a module's docstring must say why it is one piece


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every medcl_cli module `name` imports, lazy imports inside functions and `if TYPE_CHECKING:` imports
    included: a circle through either is still a circle to the reader."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert _cycles(graph) == []


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("core", {"cli", "data", "engine", "methods", "models", "predict", "evaluate", "export", "demo", "catalog", "config"}),
        ("models", {"cli", "data", "engine", "methods", "predict", "evaluate", "export", "demo", "catalog"}),
        ("methods", {"cli", "engine", "predict", "evaluate", "export", "demo", "catalog"}),
        ("data", {"cli", "engine", "methods", "models", "predict", "evaluate", "export", "demo", "catalog"}),
        ("engine", {"cli", "predict", "evaluate", "export", "demo", "catalog"}),
        ("predict", {"cli", "evaluate", "export", "demo", "catalog"}),
        ("evaluate", {"cli", "export", "demo", "catalog"}),
        ("export", {"cli", "engine", "methods", "models", "predict", "evaluate", "demo", "catalog"}),
    ],
)
def test_imports_point_one_way(graph: dict[str, set[str]], layer: str, forbidden: set[str]) -> None:
    """The library never imports the CLI; models know nothing of methods; methods never call the loop;
    data knows nothing of training; core is the bottom."""
    bad = sorted(
        f"{src} -> {dst}" for src, dsts in graph.items() if _layer(src) == layer for dst in dsts if _layer(dst) in forbidden
    )
    assert bad == []


def test_only_the_cli_imports_typer_and_rich() -> None:
    bad = []
    for name, path in _modules().items():
        if _layer(name) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            bad += [f"{name}: {m}" for m in mods if m.split(".")[0] in ("typer", "rich")]
    assert bad == []


def test_no_loose_modules_at_the_top() -> None:
    loose = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in TOP_LEVEL_MODULES)
    assert loose == [], "put a command's library code in its package (docs/architecture.md)"


def test_one_module_per_name_outside_the_cli() -> None:
    """cli/ has one file per command by design (cli/predict.py drives predict/); elsewhere a name is unique."""
    seen: dict[str, list[str]] = {}
    for name, path in _modules().items():
        if path.name == "__init__.py" or _layer(name) == "cli":
            continue
        seen.setdefault(path.stem, []).append(name)
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def test_long_modules_say_why_they_are_one_piece() -> None:
    long = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > LONG and "one piece" not in (ast.get_docstring(ast.parse(text)) or "").lower():
            long.append(f"{name} ({text.count(chr(10))} lines)")
    assert long == []


def test_every_package_is_installed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    packages = {_module_name(p.parent / "__init__.py") for p in PKG.rglob("__init__.py")}
    assert packages - listed == set(), "add the new package to [tool.setuptools] packages in pyproject.toml"
