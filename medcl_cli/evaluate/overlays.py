"""PNG overlays of a case for `medcl evaluate --overlays`: image, reference and prediction on 3 slices.

The slices shown are the three where prediction and reference disagree most (ties and perfect cases fall
back to the slices with the most foreground), so the picture shows the errors, not the easy middle slice.
Rendered with matplotlib's Agg backend (no display needed) and written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medcl_cli.core.files import atomic_path

N_SLICES = 3
# class 1.. colours (tab10 without grey); class 0 is transparent
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def pick_slices(ref: np.ndarray, pred: np.ndarray, n: int = N_SLICES) -> list[int]:
    """The z indices (sorted) with the most disagreeing voxels, then the most foreground."""
    z = ref.shape[0]
    wrong = (ref != pred).reshape(z, -1).sum(1)
    fg = ((ref > 0) | (pred > 0)).reshape(z, -1).sum(1)
    order = np.lexsort((-fg, -wrong))  # primary key: wrong (desc), then foreground (desc)
    return sorted(int(i) for i in order[: min(n, z)])


def write_overlay(
    image: np.ndarray,
    ref: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    path: Path,
    title: str,
    label_names: dict[int, str] | None = None,
) -> Path:
    """One PNG: rows = chosen slices, columns = image / reference / prediction. Arrays are (z, y, x)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    slices = pick_slices(ref, pred)
    k = int(max(int(ref.max(initial=0)), int(pred.max(initial=0)), max(label_names or {0: ""})))
    cmap = ListedColormap(["#00000000"] + [COLOURS[i % len(COLOURS)] for i in range(max(k, 1))])
    aspect = float(spacing[1]) / float(spacing[2]) if len(spacing) == 3 else 1.0
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    fig, axes = plt.subplots(len(slices), 3, figsize=(9, 3 * len(slices)), squeeze=False)
    for row, zi in enumerate(slices):
        for col, (mask, name) in enumerate(((None, "image"), (ref, "reference"), (pred, "prediction"))):
            ax = axes[row][col]
            ax.imshow(image[zi], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            if mask is not None:
                ax.imshow(mask[zi], cmap=cmap, vmin=0, vmax=max(k, 1), alpha=0.45, aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name}, slice {zi}", fontsize=9)
            ax.axis("off")
    names = label_names or {i: str(i) for i in range(1, k + 1)}
    handles = [Patch(color=COLOURS[(i - 1) % len(COLOURS)], label=names.get(i, str(i))) for i in range(1, k + 1)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=80, format="png")
    finally:
        plt.close(fig)
    return path
