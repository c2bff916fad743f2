"""Label efficiency on ACDC (benchmark.md section 1): ingest, pretrain, fine-tune, evaluate per method.

Everything goes through the `medcl` CLI in subprocesses, the way a user runs it:
1. `medcl ingest` the ACDC folder (images, labels, info.csv meta, splits.csv, label names), once;
2. `medcl pretrain` per method that has a pretraining stage: self-supervised methods once (shared by the
   label counts), methods that use masks while pretraining once per label count (`--labeled FILE`);
3. `medcl finetune --labeled splits/labeled_N.txt` (the method itself when it has a fine-tuning stage,
   else the supervised objective from the pretrained weights);
4. `medcl evaluate --split val` (and `--split all` on `--eval-data` for an independent test set).
Every stage gets the same preset (`--preset`, default templates/acdc_cpu.yaml). Wall time and peak RSS
of each stage (from the child's rusage) go in the table beside per-class Dice and HD95.

    python benchmarks/acdc.py --out bench/acdc --labeled 3 --methods all
    python benchmarks/acdc.py --out bench/acdc --methods supervised,gcl --eval-data data/acdc_test
    python benchmarks/acdc.py --out bench/uafs --methods supervised --set model.uafs_at=[dec0,dec1,dec2] --tag=+uafs
    python benchmarks/acdc.py --out bench/full --methods supervised --labeled all      # all 70 patients labelled
    python benchmarks/acdc.py --out bench/arco_ns --methods arco --labeled 3 --set arco.sampler=ns --tag=-ns \
        --pretrain-from bench/acdc      # the fine-tuning sampler alone changes: reuse the sg pretraining
    python benchmarks/acdc.py --out bench/curves --methods arco --labeled 1,3 --curve 250   # learning curves
    python benchmarks/acdc.py --out bench/curves --methods arco --labeled 1,3 --curve 250 --resume   # after a kill

Learning curves (`--curve N`): every stage validates every N steps (`train.val_every`, the engine's own
validation on the val split, which also picks best.pt); the val Dice of each validation with the step and
the wall and training seconds since the stage began (the run's metrics.csv) go into results.json as
`curve` points per row, and `OUT/METHOD/curves.png` plots them against the pipeline's step and wall
seconds (a fine-tuning point is placed after its pretraining's steps and seconds).

Resuming (`--resume`, the same arguments otherwise): a stage whose run folder finished is kept, one
with checkpoints/last.pt is continued with `medcl pretrain|finetune --resume` (the engine restores
weights, optimizer, RNG and the wall-clock offset), any other is run again; an evaluation is kept when
its summary exists. SIGINT/SIGTERM to the runner are passed on to the running stage, which saves last.pt
and stops; the runner then exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ACDC = REPO.parent / "shared" / "data" / "acdc"
LABEL_NAMES = "0=background,1=RV,2=Myo,3=LV"
CLASSES = ("RV", "Myo", "LV")


EXIT_INTERRUPTED = 130


class StageInterrupted(Exception):
    """A stage stopped by SIGINT/SIGTERM (passed on to it): the benchmark stops, to be resumed."""


class _Forward:
    """While a stage runs, SIGINT/SIGTERM to this runner go to the stage (which flushes last.pt)."""

    child: subprocess.Popen[bytes] | None = None
    received: int | None = None

    @classmethod
    def handle(cls, signum: int, frame: Any) -> None:
        cls.received = signum
        if cls.child is not None and cls.child.poll() is None:
            cls.child.send_signal(signum)
        elif cls.child is None:
            raise KeyboardInterrupt


def run_stage(args: list[str], log: Path) -> dict[str, Any]:
    """Run `medcl ARGS`; wall seconds, peak RSS (MB) of that child and its exit code; output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a" if "--resume" in args else "w", encoding="utf-8") as fh:
        fh.write("$ medcl " + " ".join(args) + "\n")
        fh.flush()
        proc = subprocess.Popen([sys.executable, "-m", "medcl_cli", *args], stdout=fh, stderr=subprocess.STDOUT)
        _Forward.child = proc
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            _Forward.child = None
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    peak_mb = usage.ru_maxrss / 1024.0  # Linux: KiB
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        msg = f"medcl {args[0]} failed (exit {proc.returncode}): {' | '.join(tail)} (log: {log})"
        if _Forward.received is not None or proc.returncode in (EXIT_INTERRUPTED, -signal.SIGINT, -signal.SIGTERM):
            raise StageInterrupted(msg)
        raise RuntimeError(msg)
    return {"seconds": round(seconds, 2), "peak_mb": round(peak_mb, 1)}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def train_stage(stage: str, run: Path, args: list[str], log: Path, resume: bool, data: Path, device: str) -> dict[str, Any]:
    """`medcl STAGE ARGS --out RUN --overwrite`; with `resume`: keep a finished run (its timing from the
    record beside the log), continue one that left checkpoints/last.pt, else run it again."""
    record = log.with_suffix(".json")
    info = _read_json(run / "run.json") if resume else None
    if info is not None and info.get("status") == "completed":
        done = _read_json(record)
        if done is not None:
            return done
    if info is not None and (run / "checkpoints" / "last.pt").is_file():
        before = float(info.get("wall_s", 0.0))
        res = run_stage([stage, "--resume", str(run), "--data", str(data), "--device", device], log)
        res = {**res, "seconds": round(res["seconds"] + before, 2), "resumed": True}
    else:
        res = run_stage([stage, *args, "--out", str(run), "--overwrite"], log)
    record.write_text(json.dumps(res), encoding="utf-8")
    return res


def eval_stage(args: list[str], out: Path, log: Path, resume: bool) -> dict[str, Any]:
    """`medcl evaluate ARGS --out OUT --overwrite`; with `resume`, kept when its summary and record exist."""
    record = log.with_suffix(".json")
    if resume and (out / "summary.json").is_file():
        done = _read_json(record)
        if done is not None:
            return done
    res = run_stage(["evaluate", *args, "--out", str(out), "--overwrite"], log)
    record.write_text(json.dumps(res), encoding="utf-8")
    return res


def curve_points(run: Path) -> list[dict[str, float]]:
    """The validations of a run folder from its metrics.csv: step, val_dice, wall_s, train_s each."""
    import csv

    path = run / "metrics.csv"
    if not path.is_file():
        return []
    points: dict[int, dict[str, float]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if (r["split"], r["metric"]) in (("val", "val_dice"), ("time", "wall_s"), ("time", "train_s")):
                points.setdefault(int(float(r["step"])), {})[r["metric"]] = float(r["value"])
    return [{"step": s, **p} for s, p in sorted(points.items()) if "val_dice" in p]


def stage_totals(run: Path) -> dict[str, float]:
    """Steps, wall and training seconds a finished run took (run.json), the offset of what follows it."""
    info = _read_json(run / "run.json") or {}
    return {"step": float(info.get("steps_done", 0)), "wall_s": float(info.get("wall_s", 0.0)),
            "train_s": float(info.get("train_s", 0.0))}


def ensure_dataset(acdc: Path, data: Path, out: Path) -> dict[str, Any] | None:
    """Ingest ACDC through the CLI unless `data` already holds a dataset folder."""
    if (data / "dataset.json").is_file():
        return None
    return run_stage(
        ["ingest", str(acdc / "images"), "--labels", str(acdc / "labels"), "--meta-csv", str(acdc / "info.csv"),
         "--split-file", str(acdc / "splits.csv"), "--label-names", LABEL_NAMES, "--out", str(data)],
        out / "logs" / "ingest.log",
    )


def method_list(spec: str) -> list[str]:
    from medcl_cli.methods import REGISTRY

    if spec == "all":
        order = ["supervised", "simclr", "gcl", "semicl", "pdcr", "arco"]
        return [m for m in order if m in REGISTRY] + sorted(set(REGISTRY) - set(order))
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(REGISTRY))}")
    return names


def scores(summary_json: Path) -> dict[str, Any]:
    js = json.loads(summary_json.read_text())
    m = js["metrics"]
    out: dict[str, Any] = {f"dice_{c}": m.get(c, {}).get("dice", {}).get("mean") for c in CLASSES}
    out.update({f"hd95_{c}": m.get(c, {}).get("hd95_mm", {}).get("mean") for c in CLASSES})
    out["dice_mean"] = m["mean_foreground"]["dice"]["mean"]
    out["hd95_mean"] = m["mean_foreground"]["hd95_mm"]["mean"]
    out["n_cases"] = js["n_cases"]
    out["n_nan"] = max(int(v.get("n_nan", 0)) for lab in m.values() for v in lab.values())
    return out


def labeled_arg(acdc: Path, n: str) -> str:
    """`--labeled` for label count `n`: splits/labeled_N.txt, or `all` (every training patient's masks)."""
    return "all" if n == "all" else str(acdc / "splits" / f"labeled_{n}.txt")


def bench_method(method: str, counts: list[str], a: argparse.Namespace, data: Path) -> list[dict[str, Any]]:
    from medcl_cli.methods import REGISTRY

    info = REGISTRY[method]
    common = ["--config", str(a.preset), "--device", a.device, "--seed", str(a.seed)]
    for s in a.set or []:
        common += ["--set", s]
    root = a.out / method
    uses_masks = re.search(r"(?<!un)labell?ed", info.needs) is not None  # "unlabelled" alone: self-supervised

    def pretrain(sub: str, labeled: list[str]) -> tuple[dict[str, Any], Path]:
        """(timing, run folder) of the pretraining in `sub` (under this method's folder): run here, or
        an earlier run's with `--pretrain-from` (same budget; only what fine-tuning does differs)."""
        if a.pretrain_from is not None:
            done = a.pretrain_from / method / sub
            return {"seconds": 0.0, "reused": str(done)}, done
        run = root / sub
        return train_stage("pretrain", run, ["--data", str(data), "--method", method, *labeled, *common],
                           run.parent / "logs" / "pretrain.log", a.resume, data, a.device), run

    shared: tuple[dict[str, Any], Path] | None = None
    if "pretrain" in info.stages and not uses_masks:
        shared = pretrain("pretrain", [])
    rows = []
    for n in counts:
        labeled = labeled_arg(a.acdc, n)
        stage_dir = root / f"labeled_{n}"
        row: dict[str, Any] = {"method": method + a.tag, "labeled": n}
        init: list[str] = []
        if "pretrain" in info.stages:
            if uses_masks:
                row["pretrain"], pre_run = pretrain(f"labeled_{n}/pretrain", ["--labeled", labeled])
            else:
                assert shared is not None
                row["pretrain"], pre_run = dict(shared[0], shared=True), shared[1]
            init = ["--init-from", str(pre_run)]
        ft_method = method if "finetune" in info.stages else "supervised"
        ft = stage_dir / "finetune"
        row["finetune"] = train_stage(
            "finetune", ft, ["--data", str(data), "--method", ft_method, "--labeled", str(labeled), *init, *common],
            stage_dir / "logs" / "finetune.log", a.resume, data, a.device)
        row["evaluate"] = eval_stage([str(ft), "--data", str(data), "--split", "val", "--device", a.device],
                                     ft / "eval_val", stage_dir / "logs" / "evaluate.log", a.resume)
        row["val"] = scores(ft / "eval_val" / "summary.json")
        if a.eval_data is not None:
            row["evaluate_other"] = eval_stage(
                [str(ft), "--data", str(a.eval_data), "--split", "all", "--device", a.device], ft / "eval_other",
                stage_dir / "logs" / "evaluate_other.log", a.resume)
            row["other"] = scores(ft / "eval_other" / "summary.json")
        if a.curve:
            row["curve"] = {"pretrain": curve_points(pre_run) if init else [], "finetune": curve_points(ft),
                            "pretrain_totals": stage_totals(pre_run) if init else None}
        rows.append(row)
    if a.curve and rows:
        plot_curves(method + a.tag, rows, root / "curves.png")
    return rows


def plot_curves(name: str, rows: list[dict[str, Any]], out: Path) -> Path:
    """Val Dice against the pipeline's step and wall seconds, one line per label count (pretraining
    points dashed; fine-tuning points shifted by their pretraining's steps and seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(rows):
        color = f"C{i}"
        c = r["curve"]
        off = c.get("pretrain_totals") or {"step": 0.0, "wall_s": 0.0}
        for ax, key in zip(axes, ("step", "wall_s")):
            pre = c["pretrain"]
            if pre:
                ax.plot([p[key] for p in pre], [100 * p["val_dice"] for p in pre], "--", color=color, marker=".")
            ft = c["finetune"]
            ax.plot([off[key] + p.get(key, float("nan")) for p in ft], [100 * p["val_dice"] for p in ft], "-",
                    color=color, marker="o", markersize=3, label=f"{r['labeled']} labelled")
            if off[key]:
                ax.axvline(off[key], color=color, linestyle=":", linewidth=0.8)
    axes[0].set_xlabel("step (pretraining, then fine-tuning)")
    axes[1].set_xlabel("wall seconds")
    for ax in axes:
        ax.set_ylabel("val Dice (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{name}: validation Dice (dashed: pretraining stage)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.1f}"


def table(rows: list[dict[str, Any]], other: bool) -> str:
    head = ["method", "labelled", "RV", "Myo", "LV", "mean Dice", "HD95", "pretrain s", "finetune s", "eval s",
            "peak MB"]
    if other:
        head += ["other: mean Dice", "other: HD95"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        v = r["val"]
        pre = r.get("pretrain")
        pre_s = "-" if not pre else f"{pre.get('seconds', 0):.0f}" + (" (shared)" if pre.get("shared") else "")
        if pre and pre.get("reused"):
            pre_s = "reused"
        peak = max(s.get("peak_mb", 0.0) for k, s in r.items() if isinstance(s, dict) and "peak_mb" in s)
        cells = [r["method"], str(r["labeled"]), _f(v["dice_RV"], True), _f(v["dice_Myo"], True),
                 _f(v["dice_LV"], True), _f(v["dice_mean"], True), _f(v["hd95_mean"]), pre_s,
                 f"{r['finetune']['seconds']:.0f}", f"{r['evaluate']['seconds']:.0f}", f"{peak:.0f}"]
        if other:
            o = r.get("other", {})
            cells += [_f(o.get("dice_mean"), True), _f(o.get("hd95_mean"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acdc", type=Path, default=DEFAULT_ACDC, help="the ACDC folder (images/, labels/, splits/)")
    p.add_argument("--data", type=Path, default=None, help="ingested dataset (default OUT/dataset; ingested if absent)")
    p.add_argument("--labeled", default="1,3,7", help="label counts (splits/labeled_N.txt), or all")
    p.add_argument("--tag", default="", help="suffix of the method name in the table, e.g. --tag=-ns or --tag=+uafs")
    p.add_argument("--pretrain-from", type=Path, default=None,
                   help="an earlier --out folder: fine-tune from its pretraining runs instead of pretraining again")
    p.add_argument("--methods", default="all", help="all, or a comma list of registry keys")
    p.add_argument("--eval-data", type=Path, default=None, help="another ingested dataset scored on all its cases")
    p.add_argument("--preset", type=Path, default=REPO / "templates" / "acdc_cpu.yaml", help="YAML config preset")
    p.add_argument("--set", action="append", help="extra config override for every stage (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve", type=int, default=0, metavar="N",
                   help="learning curves: validate every N steps of every stage (train.val_every=N)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command: finished stages are kept")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.curve < 0:
        raise SystemExit(f"--curve: expected a number of steps >= 1, found {a.curve}")
    if a.curve:
        a.set = [*(a.set or []), f"train.val_every={a.curve}"]
    a.out.mkdir(parents=True, exist_ok=True)
    data = a.data or (a.out / "dataset")
    counts = [x.strip() for x in a.labeled.split(",") if x.strip()]
    bad = [x for x in counts if not (x.isdigit() or x == "all")]
    if bad:
        raise SystemExit(f"--labeled: {bad[0]!r} is neither a label count nor all")
    results: dict[str, Any] = {"preset": str(a.preset), "overrides": a.set or [], "device": a.device,
                               "ingest": ensure_dataset(a.acdc, data, a.out), "rows": [], "failed": []}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _Forward.handle)
    for method in method_list(a.methods):
        try:
            results["rows"].extend(bench_method(method, counts, a, data))
        except RuntimeError as exc:  # one method failing does not lose the others' numbers
            results["failed"].append({"method": method, "error": str(exc)})
            print(f"warning: {exc}", file=sys.stderr)
        except (StageInterrupted, KeyboardInterrupt) as exc:
            results["interrupted"] = {"method": method, "error": str(exc)}
            (a.out / "results.json").write_text(json.dumps(results, indent=2))
            print(f"interrupted: {exc}\ncontinue with the same command and --resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        (a.out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(results["rows"], a.eval_data is not None)
    (a.out / "results.md").write_text(md + "\n")
    print(md)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
