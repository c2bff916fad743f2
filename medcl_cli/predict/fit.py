"""Does a run fit what it is asked to segment? The checks `medcl predict` and `medcl evaluate` run first.

1. A run whose segmentation head was never trained on masks (a pretraining-only run: `gcl`, `simclr`,
   `semicl`) is refused with exit 4: its output layer is random, so its masks would be noise.
2. The input is compared with the run's data profile (data/profile.py, recorded at training): another
   modality, another number of channels, or an in-plane spacing far outside the training range
   (more than `SPACING_FACTOR` times smaller or larger) gives a warning, or with `--strict` a refusal
   (exit 4). Only in-plane spacing counts: the network reads 2D slices, so the slice spacing never
   reaches it.
"""

from __future__ import annotations

from typing import Any

from medcl_cli.errors import InvalidDataError

SPACING_FACTOR = 1.5  # "far": beyond [min / 1.5, max * 1.5] of the training spacing
_AXES = ("x", "y")  # in-plane axes of a slice (spacing index 0 and 1)


class NotFitError(InvalidDataError):
    """The input does not fit the run and --strict was given (exit 4)."""


def head_trained(ckpt: dict[str, Any], run_info: dict[str, Any]) -> bool:
    """Whether the run's segmentation head was trained on masks.

    Runs record it (`segmentation_trained`, checkpoint and run.json). Older runs: a fine-tuning run, or an
    `arco` pretraining run (its stage 1 has a supervised Dice + CE term), was; other pretraining runs were not.
    """
    for source in (ckpt, run_info):
        value = source.get("segmentation_trained")
        if isinstance(value, bool):
            return value
    stage = str(ckpt.get("stage") or run_info.get("stage") or "")
    return stage != "pretrain" or str(ckpt.get("method") or run_info.get("method")) == "arco"


def require_trained_head(trained: bool, run: str, method: str) -> None:
    """Refuse (exit 4) a run whose segmentation head was never trained on masks."""
    if trained:
        return
    raise InvalidDataError(
        f"run {run} ({method}, pretraining) has no segmentation head trained on masks: its masks would be noise",
        f"fine-tune it first: medcl finetune --data DATASET --init-from {run} --labeled N --out {run}-ft, "
        "then predict or evaluate with that run",
    )


def mismatches(trained: dict[str, Any] | None, given: dict[str, Any]) -> list[str]:
    """What in `given` (a data profile) is far from the `trained` profile; [] when it fits or no profile."""
    if not trained:
        return []
    out: list[str] = []
    t_mod, g_mod = str(trained.get("modality", "unknown")), str(given.get("modality", "unknown"))
    if "unknown" not in (t_mod, g_mod) and t_mod.upper() not in g_mod.upper().split("/") \
            and g_mod.upper() not in t_mod.upper().split("/"):
        out.append(f"modality {g_mod} differs from the training data's {t_mod}")
    t_ch, g_ch = trained.get("n_channels"), given.get("n_channels")
    if isinstance(t_ch, int) and isinstance(g_ch, int) and t_ch != g_ch:
        out.append(f"{g_ch} channel(s) given, the run was trained on {t_ch}")
    t_sp, g_sp = trained.get("spacing_mm"), given.get("spacing_mm")
    if isinstance(t_sp, dict) and isinstance(g_sp, dict):
        for i, axis in enumerate(_AXES):
            lo, hi = float(t_sp["min"][i]), float(t_sp["max"][i])
            g_lo, g_hi = float(g_sp["min"][i]), float(g_sp["max"][i])
            if g_lo < lo / SPACING_FACTOR or g_hi > hi * SPACING_FACTOR:
                seen = f"{g_lo:.3g}" if g_lo == g_hi else f"{g_lo:.3g}-{g_hi:.3g}"
                out.append(f"spacing {axis} {seen} mm is far from the training range {lo:.3g}-{hi:.3g} mm")
    return out


def check_fit(trained: dict[str, Any] | None, given: dict[str, Any], what: str, strict: bool) -> list[str]:
    """The mismatches of `given` (named `what` in messages); with `strict` any mismatch is a NotFitError."""
    found = mismatches(trained, given)
    if found and strict:
        raise NotFitError(
            f"{what} does not fit the run's training data: {'; '.join(found)}",
            "use a run trained on such data, or leave out --strict to segment it anyway (with a warning)",
        )
    return found
