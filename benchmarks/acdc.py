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
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ACDC = REPO.parent / "shared" / "data" / "acdc"
LABEL_NAMES = "0=background,1=RV,2=Myo,3=LV"
CLASSES = ("RV", "Myo", "LV")


def run_stage(args: list[str], log: Path) -> dict[str, Any]:
    """Run `medcl ARGS`; wall seconds, peak RSS (MB) of that child and its exit code; output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ medcl " + " ".join(args) + "\n")
        fh.flush()
        proc = subprocess.Popen([sys.executable, "-m", "medcl_cli", *args], stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    peak_mb = usage.ru_maxrss / 1024.0  # Linux: KiB
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"medcl {args[0]} failed (exit {proc.returncode}): {' | '.join(tail)} (log: {log})")
    return {"seconds": round(seconds, 2), "peak_mb": round(peak_mb, 1)}


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
        return run_stage(["pretrain", "--data", str(data), "--method", method, *labeled, "--out", str(run),
                          "--overwrite", *common], run.parent / "logs" / "pretrain.log"), run

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
        row["finetune"] = run_stage(
            ["finetune", "--data", str(data), "--method", ft_method, "--labeled", str(labeled), *init, "--out", str(ft),
             "--overwrite", *common], stage_dir / "logs" / "finetune.log")
        row["evaluate"] = run_stage(
            ["evaluate", str(ft), "--data", str(data), "--split", "val", "--out", str(ft / "eval_val"), "--overwrite",
             "--device", a.device], stage_dir / "logs" / "evaluate.log")
        row["val"] = scores(ft / "eval_val" / "summary.json")
        if a.eval_data is not None:
            row["evaluate_other"] = run_stage(
                ["evaluate", str(ft), "--data", str(a.eval_data), "--split", "all", "--out", str(ft / "eval_other"),
                 "--overwrite", "--device", a.device], stage_dir / "logs" / "evaluate_other.log")
            row["other"] = scores(ft / "eval_other" / "summary.json")
        rows.append(row)
    return rows


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
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    data = a.data or (a.out / "dataset")
    counts = [x.strip() for x in a.labeled.split(",") if x.strip()]
    bad = [x for x in counts if not (x.isdigit() or x == "all")]
    if bad:
        raise SystemExit(f"--labeled: {bad[0]!r} is neither a label count nor all")
    results: dict[str, Any] = {"preset": str(a.preset), "overrides": a.set or [], "device": a.device,
                               "ingest": ensure_dataset(a.acdc, data, a.out), "rows": [], "failed": []}
    for method in method_list(a.methods):
        try:
            results["rows"].extend(bench_method(method, counts, a, data))
        except RuntimeError as exc:  # one method failing does not lose the others' numbers
            results["failed"].append({"method": method, "error": str(exc)})
            print(f"warning: {exc}", file=sys.stderr)
        (a.out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(results["rows"], a.eval_data is not None)
    (a.out / "results.md").write_text(md + "\n")
    print(md)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
