"""What `medcl info` reports: versions, the device medcl would pick, methods, templates."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from typing import Any

from medcl_cli import __version__


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def list_templates() -> list[str]:
    root = importlib.resources.files("medcl_cli.templates")
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def template_details() -> dict[str, dict[str, str]]:
    """Each template's file path (to copy and edit, then pass with --config) and its first comment line."""
    root = importlib.resources.files("medcl_cli.templates")
    out: dict[str, dict[str, str]] = {}
    for name in list_templates():
        res = root / f"{name}.yaml"
        first = next((ln.lstrip("# ").strip() for ln in res.read_text(encoding="utf-8").splitlines() if ln.startswith("#")), "")
        out[name] = {"path": str(res), "description": first}
    return out


def method_usage(key: str, stages: tuple[str, ...], has_template: bool) -> list[str]:
    """The command line(s) that run a method, one per stage it supports."""
    cfg = f" --config {key}.yaml" if has_template else ""
    return [f"medcl {stage} --method {key}{cfg} --data DATASET --out RUN" for stage in stages]


def collect_info() -> dict[str, Any]:
    from medcl_cli.methods import REGISTRY

    templates = template_details()

    try:
        import torch

        if torch.cuda.is_available():
            device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU)"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = f"cpu ({torch.get_num_threads()} threads)"
    except ImportError:
        device = "torch not installed"
    return {
        "version": __version__,
        "versions": {p: _version(p) for p in ("torch", "monai", "SimpleITK", "pydicom", "numpy", "pandas")},
        "device": device,
        "methods": {
            k: {
                "title": m.title,
                "stages": list(m.stages),
                "needs": m.needs,
                "citation": m.citation,
                "template": templates[k]["path"] if k in templates else None,
                "usage": method_usage(k, m.stages, k in templates),
            }
            for k, m in REGISTRY.items()
        },
        "templates": list(templates),
        "template_details": templates,
    }
