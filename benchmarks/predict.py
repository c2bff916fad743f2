"""Prediction speed and memory (benchmark.md section 4): `medcl predict` against the bare forward passes.

On the same volumes (default: the ACDC validation volumes) and the same model:
- `predict`: what `medcl predict` does per volume - read the file, preprocess, batched forward, softmax,
  back to the original grid, argmax, atomic verified NIfTI write, sha256 + JSON sidecar;
- `forward`: only the network's forward passes over the same preprocessed slices (same batch size);
- `cli`: the whole `medcl predict RUN FILES --out DIR` command once, start-up included.
Each mode runs in its own process so its peak RSS is its own (CUDA: max allocated). Seconds per volume
are medians over `--repeats`; the table shows the overhead of predict over the bare network.

    python benchmarks/predict.py --run runs/ft --out bench/predict
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ACDC = REPO.parent / "shared" / "data" / "acdc"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode: str, run: Path, files: list[Path], repeats: int, batch_size: int, device: str) -> dict[str, Any]:
    """Measure one mode inside this process; returns per-volume medians and memory."""
    import torch

    from medcl_cli.data.io import read_image
    from medcl_cli.data.preprocess import image_slices
    from medcl_cli.engine.device import resolve_device
    from medcl_cli.predict.inference import load_model, volume_array
    from medcl_cli.predict.item import PredictInput
    from medcl_cli.predict.runner import predict_all

    dev = resolve_device(device)
    model = load_model(run, dev)
    base_mb = _peak_mb()
    per_volume: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            times = []
            if mode == "forward":
                prep = model.preprocessing
                x, _ = image_slices(volume_array(read_image(f)), int(prep["image_size"]), str(prep["resize"]),
                                    str(prep["normalize"]))
            for _ in range(repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                if mode == "forward":
                    with torch.inference_mode():
                        for s in range(0, x.shape[0], batch_size):
                            model.net(x[s : s + batch_size].to(dev))
                else:
                    item = PredictInput(name=f.name.split(".")[0], kind="volume", files=[f],
                                        load=functools.partial(read_image, f), display=f.name)
                    res = predict_all(model, [item], Path(tmp), overwrite=True, batch_size=batch_size)
                    if res.failed:
                        raise RuntimeError(f"{f}: {res.failed[0][1]}")
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            per_volume[f.name] = statistics.median(times)
    out: dict[str, Any] = {"mode": mode, "per_volume": per_volume, "peak_rss_mb": _peak_mb(), "after_load_mb": base_mb,
                           "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def run_child(mode: str, a: argparse.Namespace, files: list[Path]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--run", str(a.run), "--repeats", str(a.repeats),
           "--batch-size", str(a.batch_size), "--device", a.device, "--out", str(a.out), "--inputs", *map(str, files)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_cli(a: argparse.Namespace, files: list[Path]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "medcl_cli", "-q", "predict", str(a.run), *map(str, files), "--out", tmp,
               "--device", a.device, "--batch-size", str(a.batch_size)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"medcl predict failed: {proc.stderr.read().decode()[-1000:] if proc.stderr else ''}")
    return {"mode": "cli", "total_seconds": seconds, "per_volume_mean": seconds / len(files),
            "peak_rss_mb": usage.ru_maxrss / 1024.0}


def default_files(acdc: Path) -> list[Path]:
    ids = [s.strip() for s in (acdc / "splits" / "val.txt").read_text().splitlines() if s.strip()]
    return [acdc / "images" / f"{c}.nii.gz" for c in ids]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder (or checkpoint) of medcl finetune")
    p.add_argument("--inputs", type=Path, nargs="*", help="volumes (default: the ACDC validation volumes)")
    p.add_argument("--acdc", type=Path, default=DEFAULT_ACDC)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--child", choices=("predict", "forward"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    files = list(a.inputs or default_files(a.acdc))
    if a.child:
        print(json.dumps(child(a.child, a.run, files, a.repeats, a.batch_size, a.device)))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    forward, predict = run_child("forward", a, files), run_child("predict", a, files)
    cli = run_cli(a, files)
    names = list(forward["per_volume"])
    ratios = [predict["per_volume"][n] / max(forward["per_volume"][n], 1e-9) for n in names]
    results = {"volumes": len(files), "batch_size": a.batch_size, "repeats": a.repeats, "forward": forward,
               "predict": predict, "cli": cli, "median_ratio_predict_to_forward": statistics.median(ratios)}
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    med = {m: statistics.median(r["per_volume"].values()) for m, r in (("forward", forward), ("predict", predict))}
    lines = [
        "| mode | median s / volume | total s | peak RSS MB | x forward |",
        "|---|---|---|---|---|",
        f"| forward passes only | {med['forward']:.3f} | {sum(forward['per_volume'].values()):.2f} | "
        f"{forward['peak_rss_mb']:.0f} | 1.00 |",
        f"| predict (read, preprocess, forward, resample, write, sidecar) | {med['predict']:.3f} | "
        f"{sum(predict['per_volume'].values()):.2f} | {predict['peak_rss_mb']:.0f} | "
        f"{results['median_ratio_predict_to_forward']:.2f} |",
        f"| medcl predict CLI (incl. start-up) | {cli['per_volume_mean']:.3f} (mean) | {cli['total_seconds']:.2f} | "
        f"{cli['peak_rss_mb']:.0f} | - |",
    ]
    md = "\n".join(lines)
    (a.out / "results.md").write_text(md + "\n")
    print(f"{len(files)} volumes, batch {a.batch_size}, medians over {a.repeats} repeats")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
