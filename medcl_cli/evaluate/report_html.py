"""`medcl evaluate --report`: one self-contained HTML page (images embedded as data URIs).

The page holds the summary table, the per-class distributions of Dice and HD95 (box plots with every case
drawn as a point), and for each case its middle slices with reference and prediction overlaid, worst
cases first, so the reader sees the failures before the successes. No external files, scripts or fonts:
it opens from an e-mail attachment or a shared drive as it is.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from medcl_cli.evaluate.overlays import COLOURS

PANEL_SLICES = 3  # middle slices shown per case


def _png_data_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def middle_slices(ref: np.ndarray, pred: np.ndarray, n: int = PANEL_SLICES) -> list[int]:
    """The n slices around the middle of the structure (reference or prediction), or of the volume."""
    z = ref.shape[0]
    fg = np.flatnonzero(((ref > 0) | (pred > 0)).reshape(z, -1).any(1))
    lo, hi = (int(fg[0]), int(fg[-1])) if fg.size else (0, z - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]}) or [z // 2]


def case_panel(image: np.ndarray, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], n_classes: int) -> str:
    """A PNG data URI: the middle slices, reference (left) and prediction (right) overlaid on the image."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    slices = middle_slices(ref, pred)
    k = max(n_classes - 1, int(ref.max(initial=0)), int(pred.max(initial=0)), 1)
    cmap = ListedColormap(["#00000000"] + [COLOURS[i % len(COLOURS)] for i in range(k)])
    aspect = float(spacing[1]) / float(spacing[2]) if len(spacing) == 3 else 1.0
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    fig, axes = plt.subplots(2, len(slices), figsize=(2.2 * len(slices), 4.4), squeeze=False)
    for col, zi in enumerate(slices):
        for row, (mask, name) in enumerate(((ref, "reference"), (pred, "prediction"))):
            ax = axes[row][col]
            ax.imshow(image[zi], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.imshow(mask[zi], cmap=cmap, vmin=0, vmax=k, alpha=0.45, aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name} z={zi}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return _png_data_uri(fig)


def distribution_plot(per_case: pd.DataFrame, metric: str, ylabel: str) -> str:
    """Box plot per class with each case as a jittered point; NaNs are counted in the axis label."""
    plt = _pyplot()
    labels = list(dict.fromkeys(per_case["label"].astype(str)))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 3.2))
    rng = np.random.default_rng(0)
    data, names = [], []
    for i, lab in enumerate(labels):
        vals = pd.to_numeric(per_case.loc[per_case["label"].astype(str) == lab, metric], errors="coerce")
        finite = vals[np.isfinite(vals)].to_numpy()
        n_nan = int(len(vals) - len(finite))
        data.append(finite)
        names.append(lab + (f"\n({n_nan} NaN)" if n_nan else ""))
        ax.scatter(i + 1 + rng.uniform(-0.12, 0.12, len(finite)), finite, s=10, color=COLOURS[i % len(COLOURS)], zorder=3)
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png_data_uri(fig)


def _summary_rows(summary: pd.DataFrame) -> str:
    rows = []
    for label, df in summary.groupby("label", sort=False):
        m = {r["metric"]: r for r in df.to_dict("records")}
        cells = []
        for key in ("dice", "iou", "hd95_mm"):
            r = m.get(key)
            cells.append(f"<td>{r['mean']:.3f} &plusmn; {r['std']:.3f}</td>" if r is not None else "<td>-</td>")
        n = int(m["dice"]["n"]) if "dice" in m else 0
        n_nan = sum(int(r.get("n_nan", 0)) for r in m.values())
        rows.append(f"<tr><th>{html.escape(str(label))}</th>{''.join(cells)}<td>{n}</td><td>{n_nan}</td></tr>")
    return "\n".join(rows)


def render_report(
    per_case: pd.DataFrame,
    summary: pd.DataFrame,
    info: dict[str, Any],
    panels: dict[str, str],
) -> str:
    """The whole page as a string. `panels` maps case_id to a PNG data URI (see `case_panel`)."""
    order = per_case.groupby("case_id")["dice"].mean().sort_values()
    cases_html = []
    for case_id, mean_dice in order.items():
        rows = per_case[per_case["case_id"] == case_id]
        detail = ", ".join(
            f"{html.escape(str(r['label']))} {float(r['dice']):.3f}" for r in rows.to_dict("records")
        )
        img = panels.get(str(case_id))
        pic = f'<img alt="{html.escape(str(case_id))}" src="{img}">' if img else "<p>(no picture)</p>"
        cases_html.append(
            f'<section class="case"><h3>{html.escape(str(case_id))} &mdash; mean Dice {mean_dice:.3f}</h3>'
            f"<p>{detail}</p>{pic}</section>"
        )
    title = f"medcl evaluation: {info.get('method', '')} on {info.get('split', '')}"
    meta = " &middot; ".join(
        html.escape(f"{k}: {info[k]}") for k in ("run_id", "method", "split", "dataset_fingerprint", "n_cases") if k in info
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f3f3f3; }}
.plots img, .case img {{ max-width: 100%; }}
.case {{ border-top: 1px solid #ddd; padding-top: .5em; }}
.rule {{ color: #555; font-size: .9em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{meta}</p>
<h2>Summary</h2>
<table id="summary"><tr><th>label</th><th>Dice</th><th>IoU</th><th>HD95 (mm)</th><th>n</th><th>n NaN</th></tr>
{_summary_rows(summary)}
</table>
<p class="rule">Empty masks: both empty scores Dice 1 and HD95 0; exactly one empty scores Dice 0 and HD95 =
the image diagonal in mm. No case is dropped from a mean.</p>
<h2>Distributions</h2>
<div class="plots"><img alt="Dice per class" src="{distribution_plot(per_case, 'dice', 'Dice')}">
<img alt="HD95 per class" src="{distribution_plot(per_case, 'hd95_mm', 'HD95 (mm)')}"></div>
<h2>Cases, worst first</h2>
{''.join(cases_html)}
</body></html>
"""

