"""semicl's local-loss step against the supervised step: time and peak memory, stride vs block mode.

For each image size, every configuration runs in a fresh subprocess (so its peak RSS is its own) on the
same batch of real ACDC slices (`--data`, the shared raw folder: images/ and labels/ NIfTI), resized to
the size: a supervised step (U-Net + Dice-CE on all B slices) and semicl's local step (two views of the
B x labeled_fraction labelled slices, dense head, supervised local contrast), forward + backward. Peak
memory is the growth of the process's peak RSS over its RSS before the first step (CPU) or the max
allocated memory (CUDA). Prints a Markdown table, writes results.json.

    python benchmarks/semicl_memory.py --data ../shared/data/acdc --sizes 64 128 256 --out bench_semicl
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = {
    "supervised": [],
    "semicl stride": ["semicl.mode=stride"],
    "semicl block": ["semicl.mode=block"],
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def load_batch(data: Path, size: int, batch: int) -> tuple[Any, Any]:
    """`batch` mid-ventricular ACDC slices (images z-scored per volume, labels nearest) at size x size."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from medcl_cli.data.preprocess import image_slices, label_slices

    images, labels = [], []
    for path in sorted((data / "images").glob("*.nii.gz")):
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labels" / path.name))).astype(np.int64)
        x, info = image_slices(img, size, "resize", "zscore")
        y = label_slices(lab, info)
        mid = slice(max(len(x) // 2 - 1, 0), len(x) // 2 + 1)
        images.append(x[mid])
        labels.append(y[mid])
        if sum(len(t) for t in images) >= batch:
            break
    return torch.cat(images)[:batch].float(), torch.cat(labels)[:batch].long()


def child(args: argparse.Namespace) -> None:
    """One configuration: build, warm up, time `--repeats` steps, report JSON on stdout."""
    import torch

    from medcl_cli.config import load_config
    from medcl_cli.engine.protocol import DataSpec
    from medcl_cli.methods.semicl import SemiCL
    from medcl_cli.models.unet import build_unet

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sets = [f"data.image_size={args.size}", "semicl.stages=[local]", *CONFIGS[args.config]]
    cfg = load_config(sets=sets)
    image, label = load_batch(Path(args.data), args.size, args.batch)
    torch.manual_seed(0)
    net = build_unet(cfg.model, 4).to(device)
    image, label = image.to(device), label.to(device)
    n_lab = max(1, int(round(args.batch * cfg.train.labeled_fraction_per_batch)))
    labeled = torch.arange(args.batch, device=device) < n_lab
    if args.config == "supervised":
        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

        def step() -> None:
            loss = loss_fn(net(image).logits, label[:, None])
            loss.backward()

        module: torch.nn.Module = net
    else:
        method = SemiCL(net, cfg, DataSpec(num_classes=4, stage="pretrain")).to(device)
        batch = {"image": image, "image2": image, "label": torch.where(labeled[:, None, None], label, -1),
                 "labeled": labeled}

        def step() -> None:
            method.training_step(batch)["loss"].backward()

        module = method
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    rss0 = _rss_mb()
    times = []
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t)
        module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    print(json.dumps({"config": args.config, "size": args.size, "step_s": statistics.median(times), "peak_mb": peak}))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"))
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench_semicl")
    p.add_argument("--child", default="")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--config", default="supervised")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    rows = []
    for size in args.sizes:
        for name in CONFIGS:
            cmd = [sys.executable, __file__, "--child", "1", "--config", name, "--size", str(size),
                   "--data", args.data, "--batch", str(args.batch), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            print(f"measured {name} at {size}", file=sys.stderr, flush=True)
    base = {r["size"]: r for r in rows if r["config"] == "supervised"}
    lines = ["| size | config | s/step | x supervised | peak MB | x supervised |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["size"]]
        r["time_ratio"] = r["step_s"] / b["step_s"]
        r["memory_ratio"] = r["peak_mb"] / max(b["peak_mb"], 1e-9)
        lines.append(f"| {r['size']} | {r['config']} | {r['step_s']:.3f} | {r['time_ratio']:.2f} | "
                     f"{r['peak_mb']:.0f} | {r['memory_ratio']:.2f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"batch": args.batch, "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
