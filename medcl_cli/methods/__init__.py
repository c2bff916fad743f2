"""The method registry: a literal dict, one entry per method file (key = file stem = template name).

Importing this package imports no torch; `load_method_class` imports the method's module on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from medcl_cli.errors import UsageError, unknown_choice


@dataclass(frozen=True)
class MethodInfo:
    key: str
    title: str
    stages: tuple[str, ...]  # "pretrain" and/or "finetune"
    needs: str  # what data the method uses
    citation: str
    cls: str  # class name inside medcl_cli.methods.<key>


REGISTRY: dict[str, MethodInfo] = {
    "supervised": MethodInfo(
        "supervised", "Dice + cross-entropy baseline", ("finetune",), "labelled slices", "-", "Supervised"
    ),
    "pdcr": MethodInfo(
        "pdcr",
        "PDCR: Dice + CE + patch-dragsaw contrast of hidden features (with the UAFS block)",
        ("finetune",),
        "labelled slices",
        "Liu, Li et al., IEEE TMI 2022 (arXiv 2201.08779)",
        "PDCR",
    ),
    "simclr": MethodInfo(
        "simclr",
        "SimCLR: global NT-Xent on two views of each slice",
        ("pretrain",),
        "unlabelled slices",
        "Chen et al., ICML 2020",
        "SimCLR",
    ),
    "semicl": MethodInfo(
        "semicl",
        "semicl: global NT-Xent, then supervised local contrast on the labelled slices (stride or block)",
        ("pretrain",),
        "all slices (global) + labelled slices (local)",
        "Hu et al., MICCAI 2021 (arXiv 2109.07407)",
        "SemiCL",
    ),
    "gcl": MethodInfo(
        "gcl",
        "GCL: gradient-guided meta-label contrast (image + pixel, gradient mitigator and filter)",
        ("pretrain",),
        "unlabelled slices + meta labels",
        "Wu et al., ACM MM 2023 (arXiv 2309.08888)",
        "GCL",
    ),
    "arco": MethodInfo(
        "arco",
        "ARCO: mean teacher, relational pretraining, SG/SAG-sampled prototype contrast + pseudo-labels",
        ("pretrain", "finetune"),
        "few labelled + unlabelled slices",
        "You et al., NeurIPS 2023 (arXiv 2302.01735)",
        "ARCO",
    ),
}


def get_info(key: str, stage: str | None = None) -> MethodInfo:
    """The registry entry of `key`, checked against `stage` with a helpful error."""
    if key not in REGISTRY:
        raise unknown_choice("method", key, REGISTRY)
    info = REGISTRY[key]
    if stage is not None and stage not in info.stages:
        if stage == "pretrain":
            raise UsageError(
                f"'{key}' is a fine-tuning objective, not a pretraining method",
                f"run it with: medcl finetune --method {key} --data DATASET --labeled N --out RUN",
            )
        raise UsageError(
            f"'{key}' is a pretraining method, it has no fine-tuning objective",
            f"pretrain with it, then fine-tune: medcl pretrain --method {key} ... && "
            "medcl finetune --init-from RUN --method supervised ...",
        )
    return info


def load_method_class(key: str) -> type:
    info = get_info(key)
    module = importlib.import_module(f"medcl_cli.methods.{key}")
    return getattr(module, info.cls)
