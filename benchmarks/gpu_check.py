"""The ARCO part of the GPU check (benchmarks/gpu_check.sh; docs/benchmarks.md "GPU check").

`arco` (sampler sg) on ACDC with 3 labelled patients (splits/labeled_3.txt) and the paper preset
(templates/acdc_paper.yaml: 256 px, batch 24 with 12 labelled, SGD 0.01 poly), pretraining then
fine-tuning from it, through the library side of `medcl pretrain` / `medcl finetune` (engine/training.py:
the same config resolution, fit loop, AMP and channels-last as the CLI), in this process so that
torch.cuda.max_memory_allocated sees every step.

Budget: the two stages together get `--budget` seconds (default 360) of wall time, probes included.
A timing probe runs each stage for `--probe-steps` steps first (fresh run folders, thrown away); its
seconds per step (data + step, the first steps' cudnn autotuning included, so an upper bound) and its
fixed cost (cache, network build, final validation) set the number of steps, the same for both stages,
so that both stages finish inside what is left of the budget. A number of steps, not a wall-clock stop:
the poly schedule then decays to zero at the last step, as in a full run.

Prints, and writes to OUT/gpu_check.json: iterations per second (per stage, and over both), the
validation Dice of the fine-tuned network (mean foreground Dice per 3D volume, 20 ACDC val volumes) and
the peak GPU memory (torch.cuda.max_memory_allocated over both stages, MiB).

    python benchmarks/gpu_check.py                                  # needs CUDA and ../shared/data/acdc
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_dry     # CPU, synthetic data, 32 px, few steps

`--dry-run` runs the same path on the CPU: a synthetic dataset (medcl_cli/data/synthetic.py) instead of
ACDC, 32 x 32 slices, batch 4 (2 labelled), a U-Net a quarter as wide, one probe step and at
most `--dry-run-steps` steps per stage (default 2): it checks the path (config, data, both stages,
checkpoints, the numbers printed), not the speed. The peak GPU memory
is then 0 (no GPU) and the peak resident memory of the process is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "templates" / "acdc_paper.yaml"
EXIT_USAGE, EXIT_NOT_FOUND = 2, 3


class _Log:
    """A medcl Reporter that prints the engine's log lines (progress bars are left out)."""

    def log(self, message: str, level: str = "info") -> None:
        print(f"  [{level}] {message}", file=sys.stderr, flush=True)

    def start(self, task: str, total: int | None) -> None:
        pass

    def advance(self, task: str, n: int = 1, **fields: object) -> None:
        pass

    def finish(self, task: str) -> None:
        pass


def find_acdc(explicit: Path | None) -> Path:
    """--acdc, else $MEDCL_SHARED_DATA/acdc, else ../shared/data/acdc beside the repository."""
    if explicit is not None:
        return explicit
    shared = os.environ.get("MEDCL_SHARED_DATA")
    root = Path(shared).expanduser() if shared else REPO.parent / "shared" / "data"
    return root / "acdc"


def fail(message: str, hint: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    print(f"hint: {hint}", file=sys.stderr)
    return code


def run_stage(stage: str, data: Path, out: Path, steps: int, labeled: str, sets: list[str], device: str,
              preset: Path, init_from: Path | None = None) -> dict[str, Any]:
    """One `medcl pretrain|finetune --method arco` through engine/training.py; its timings and val Dice."""
    from medcl_cli.engine.training import train

    opts: dict[str, Any] = {
        "data": data, "out": out, "steps": steps, "method": "arco", "labeled": labeled, "device": device,
        "config": [str(preset)], "sets": ["arco.sampler=sg", *sets], "overwrite": True, "init_from": init_from,
    }
    t0 = time.perf_counter()
    outcome = train(stage, opts, _Log())
    wall = time.perf_counter() - t0
    info = json.loads((out / "run.json").read_text())
    timings = info.get("timings", {})
    per_step = float(timings.get("data_s_per_step", 0.0)) + float(timings.get("train_s_per_step", 0.0))
    return {
        "stage": stage,
        "steps": steps,
        "wall_s": round(wall, 2),
        "s_per_step": per_step,
        "fixed_s": max(wall - steps * per_step, 0.0),
        "iterations_per_second": (1.0 / per_step) if per_step > 0 else float("nan"),
        "val_dice": outcome.best,
        "precision": info.get("precision"),
        "device": info.get("device"),
    }


def plan_steps(budget_left: float, probes: list[dict[str, Any]], margin: float = 0.05) -> int:
    """Steps per stage so that every stage (fixed cost + steps x seconds per step) fits `budget_left`."""
    fixed = sum(p["fixed_s"] for p in probes)
    per_step = sum(p["s_per_step"] for p in probes)
    usable = budget_left * (1.0 - margin) - fixed
    return max(int(usable / per_step), 1) if per_step > 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check",
                   help="work folder: dataset, runs, gpu_check.json (default benchmarks/results/gpu_check)")
    p.add_argument("--acdc", type=Path, default=None, help="ACDC folder (default: $MEDCL_SHARED_DATA/acdc "
                   "or ../shared/data/acdc)")
    p.add_argument("--data", type=Path, default=None, help="an ingested ACDC dataset folder (default OUT/dataset)")
    p.add_argument("--budget", type=float, default=360.0, help="seconds for both stages, probes included")
    p.add_argument("--probe-steps", type=int, default=20, help="steps of each stage's timing probe")
    p.add_argument("--labeled", default="3", help="labelled patients (splits/labeled_N.txt)")
    p.add_argument("--preset", type=Path, default=PRESET)
    p.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="the same path on the CPU: synthetic data, 32 px")
    p.add_argument("--dry-run-steps", type=int, default=2, help="most steps per stage in a dry run")
    a = p.parse_args(argv)

    import torch

    sets = list(a.set)
    if a.dry_run:
        device = "cpu"
        from medcl_cli.data.synthetic import make_synthetic_dataset

        data = a.data or a.out / "dataset"
        if not (data / "dataset.json").is_file():
            make_synthetic_dataset(data, n_patients=6, seed=0)
        labeled = a.labeled if a.labeled.isdigit() else "3"
        sets = ["data.image_size=32", "train.batch_size=4", "model.channels=[4,8,16,32,64]", *sets]
        probe_steps = 1
    else:
        if not torch.cuda.is_available():
            return fail("no CUDA GPU is visible to torch", "run on a machine with an NVIDIA GPU and a CUDA build "
                        "of torch, or try the same path on the CPU with --dry-run", EXIT_USAGE)
        device = "cuda"
        acdc = find_acdc(a.acdc)
        if not (acdc / "images").is_dir():
            return fail(f"ACDC not found at {acdc}", "give --acdc DIR or set MEDCL_SHARED_DATA to the folder that "
                        "holds acdc/", EXIT_NOT_FOUND)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import acdc as acdc_bench  # benchmarks/acdc.py: the same ingest and labelled lists as the table

        data = a.data or a.out / "dataset"
        a.out.mkdir(parents=True, exist_ok=True)
        t_ingest = time.perf_counter()
        acdc_bench.ensure_dataset(acdc, data, a.out)
        print(f"gpu_check: dataset {data} ready in {time.perf_counter() - t_ingest:.0f} s", flush=True)
        labeled = acdc_bench.labeled_arg(acdc, a.labeled)
        probe_steps = max(a.probe_steps, 1)
    a.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    probes = [
        run_stage(stage, data, a.out / f"probe_{stage}", probe_steps, labeled, sets, device, a.preset)
        for stage in ("pretrain", "finetune")
    ]
    steps = plan_steps(a.budget - (time.perf_counter() - t0), probes)
    if a.dry_run:
        steps = min(steps, max(a.dry_run_steps, 1))
    for pr in probes:
        print(f"gpu_check: probe {pr['stage']}: {pr['s_per_step']:.3f} s/step, {pr['fixed_s']:.1f} s fixed "
              f"({pr['precision']}, {pr['device']})", flush=True)
    print(f"gpu_check: {steps} steps per stage to fit {a.budget:.0f} s", flush=True)

    if torch.cuda.is_available() and not a.dry_run:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pre = run_stage("pretrain", data, a.out / "pretrain", steps, labeled, sets, device, a.preset)
    ft = run_stage("finetune", data, a.out / "finetune", steps, labeled, sets, device, a.preset,
                   init_from=a.out / "pretrain")
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if (torch.cuda.is_available() and not a.dry_run) else 0.0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    train_s = pre["steps"] * pre["s_per_step"] + ft["steps"] * ft["s_per_step"]
    its = (pre["steps"] + ft["steps"]) / train_s if train_s > 0 else float("nan")
    result = {
        "dry_run": a.dry_run, "device": ft["device"], "precision": ft["precision"], "preset": str(a.preset),
        "labeled": a.labeled, "budget_s": a.budget, "steps_per_stage": steps,
        "iterations_per_second": its, "val_dice": ft["val_dice"], "peak_gpu_memory_mb": peak_gpu,
        "peak_rss_mb": peak_rss, "elapsed_s": round(time.perf_counter() - t0, 1),
        "stages": [pre, ft], "probes": probes,
    }
    (a.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    for r in (pre, ft):
        dice = "-" if r["val_dice"] is None else f"{r['val_dice']:.4f}"
        print(f"gpu_check: arco {r['stage']}: {r['steps']} steps, {r['iterations_per_second']:.2f} it/s, "
              f"val Dice {dice}, {r['wall_s']:.0f} s", flush=True)
    print(f"iterations_per_second: {its:.3f}")
    print(f"val_dice: {'nan' if ft['val_dice'] is None else format(ft['val_dice'], '.4f')}")
    print(f"peak_gpu_memory_mb: {peak_gpu:.0f}" + (" (dry run on CPU: no GPU)" if a.dry_run else ""))
    print(f"peak_rss_mb: {peak_rss:.0f}")
    print(f"gpu_check: arco part {result['elapsed_s']:.0f} s (budget {a.budget:.0f} s); {a.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
