"""One figure of ACDC learning curves from the run folders of `benchmarks/acdc.py --curve N` runs.

acdc.py plots each method's `curves.png` when its rows finish; this reads the run folders directly, so a
runner stopped mid-stage (the session ended; `--resume` continues it later) still shows what it measured.
Every stage folder under each OUT given (`METHOD/labeled_N/{pretrain,finetune}`, `METHOD/pretrain`) becomes
one line of val Dice against the pipeline's step: pretraining dashed, fine-tuning solid and placed after its
pretraining's steps. It prints, per line, the last and best point (step, val Dice) as a Markdown table.

    python benchmarks/curves.py bench/curves-supervised-3 bench/curves-arco-3 --out docs/img/acdc_curves.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acdc as acdc_bench  # noqa: E402  benchmarks/acdc.py: metrics.csv and run.json readers of the runner


def stage_lines(out: Path) -> list[dict[str, Any]]:
    """Lines of one runner folder: method, label count, stage, points (step offset for fine-tuning)."""
    lines = []
    for method_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in ("dataset", "logs")):
        shared = method_dir / "pretrain"
        for lab in sorted(method_dir.glob("labeled_*")):
            n = lab.name.removeprefix("labeled_")
            pre = lab / "pretrain" if (lab / "pretrain").is_dir() else shared if shared.is_dir() else None
            offset = 0.0
            if pre is not None:
                pts = acdc_bench.curve_points(pre)
                if pts:
                    lines.append({"method": method_dir.name, "labeled": n, "stage": "pretrain", "points": pts})
                offset = acdc_bench.stage_totals(pre)["step"] or (pts[-1]["step"] if pts else 0.0)
            pts = acdc_bench.curve_points(lab / "finetune")
            if pts:
                lines.append({"method": method_dir.name, "labeled": n, "stage": "finetune",
                              "points": [dict(p, step=p["step"] + offset) for p in pts]})
    return lines


def plot(lines: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors: dict[tuple[str, str], str] = {}
    for ln in lines:
        key = (ln["method"], ln["labeled"])
        color = colors.setdefault(key, f"C{len(colors)}")
        ax.plot([p["step"] for p in ln["points"]], [100 * p["val_dice"] for p in ln["points"]],
                "--" if ln["stage"] == "pretrain" else "-", color=color, marker=".", markersize=4,
                label=f"{ln['method']}, {ln['labeled']} labelled ({ln['stage']})")
    ax.set_xlabel("step (fine-tuning placed after its pretraining)")
    ax.set_ylabel("val mean Dice of RV/Myo/LV (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def table(lines: list[dict[str, Any]]) -> str:
    rows = ["| method | labelled | stage | steps so far | last val Dice | best val Dice (step) |", "|---|---|---|---|---|---|"]
    for ln in lines:
        last = ln["points"][-1]
        best = max(ln["points"], key=lambda p: p["val_dice"])
        rows.append(f"| {ln['method']} | {ln['labeled']} | {ln['stage']} | {last['step']:.0f} | "
                    f"{100 * last['val_dice']:.1f} | {100 * best['val_dice']:.1f} ({best['step']:.0f}) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outs", nargs="+", type=Path, help="--out folders of benchmarks/acdc.py --curve runs")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    a = p.parse_args(argv)
    lines = [ln for o in a.outs for ln in stage_lines(o)]
    if not lines:
        print(f"error: no validation points under {', '.join(map(str, a.outs))} (were they run with --curve?)",
              file=sys.stderr)
        return 3
    print(table(lines))
    print(f"plot: {plot(lines, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
