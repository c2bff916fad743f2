"""semicl's local-loss step against the supervised step: time and peak memory, stride vs block mode.

Same batch of real ACDC slices for every configuration (`--data`, the shared raw folder: images/ and
labels/ NIfTI, two mid-ventricular slices per volume), resized to each size: a supervised step (U-Net +
Dice-CE on all B slices) and semicl's local step (two views of the B x labeled_fraction labelled slices,
dense head, supervised local contrast), forward + backward. Step times: medians of rounds run
round-robin in one process. Peak memory: a fresh process per configuration, the growth of its peak RSS
over its RSS before the step (CPU) or the max allocated memory (CUDA). A second table isolates the
local loss: its anchor x member pair count and peak memory with the default `pair_chunk` bound and
without it (stride pairs grow 16x per doubling of the image side, block pairs 4x).
Prints Markdown tables, writes results.json.

    python benchmarks/semicl_memory.py --data ../shared/data/acdc --out bench_semicl
        (defaults: the CPU preset templates/acdc_cpu.yaml, its batch, its image size x1, x2, x4)
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


PRESET = Path(__file__).resolve().parents[1] / "templates" / "acdc_cpu.yaml"


def _config(preset: str, size: int | None, extra: list[str]) -> Any:
    from medcl_cli.config import load_config

    files = [preset] if preset else []
    sets = [f"data.image_size={size}"] if size else []
    return load_config(files, sets=[*sets, "semicl.stages=[local]", *extra])


def _build(config: str, size: int, batch: int, data: str, device: Any, preset: str = "") -> tuple[Any, Any]:
    """(step function, module) of one configuration on the shared batch."""
    import torch

    from medcl_cli.core.protocol import DataSpec
    from medcl_cli.methods.semicl import SemiCL
    from medcl_cli.models.unet import build_unet

    cfg = _config(preset, size, CONFIGS[config])
    image, label = load_batch(Path(data), size, batch)
    torch.manual_seed(0)
    net = build_unet(cfg.model, 4).to(device)
    image, label = image.to(device), label.to(device)
    if config == "supervised":
        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

        def sup_step() -> None:
            loss_fn(net(image).logits, label[:, None]).backward()

        return sup_step, net
    # the default config runs both stages: the batch mixes labelled and unlabelled slices
    n_lab = max(1, int(round(batch * cfg.train.labeled_fraction_per_batch)))
    labeled = torch.arange(batch, device=device) < n_lab
    method = SemiCL(net, cfg, DataSpec(num_classes=4, stage="pretrain")).to(device)
    b = {"image": image, "image2": image, "label": torch.where(labeled[:, None, None], label, -1), "labeled": labeled}

    def local_step() -> None:
        method.training_step(b)["loss"].backward()

    return local_step, method


def child_memory(args: argparse.Namespace) -> None:
    """Peak memory of one configuration's first step (fresh process: its peak RSS is its own)."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step, module = _build(args.config, args.size, args.batch, args.data, device, args.preset)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    rss0 = _rss_mb()
    step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    print(json.dumps({"peak_mb": peak}))


def child_time(args: argparse.Namespace) -> None:
    """Median step time of every configuration, measured round-robin in one process (load changes on a
    shared machine hit all of them alike)."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    built = {name: _build(name, args.size, args.batch, args.data, device, args.preset) for name in CONFIGS}
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(args.repeats + 1):
        for name, (step, module) in built.items():
            t = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r:
                times[name].append(time.perf_counter() - t)
            module.zero_grad(set_to_none=True)
    print(json.dumps({name: statistics.median(v) for name, v in times.items()}))


def child_loss(args: argparse.Namespace) -> None:
    """Peak memory of the local loss alone (forward + backward on fixed unit features, the real labels of
    the two views of the labelled slices): its pair count, with the default memory bound and without."""
    import torch
    import torch.nn.functional as F

    from medcl_cli.methods.losses.local_contrast import local_supcon_parts
    from medcl_cli.methods.semicl import block_pixels, stride_pixels

    torch.set_num_threads(args.threads)
    _, label = load_batch(Path(args.data), args.size, args.batch)
    lab = label[: max(1, args.batch // 2)]
    labels = torch.cat([lab, lab])
    feat = torch.randn(labels.shape[0], 32, args.size, args.size)
    mode, chunk = args.config.split(":")
    z, zl = stride_pixels(feat, labels, 4) if mode == "stride" else block_pixels(feat, labels, 16)
    if mode == "stride":
        z, zl = z[None], zl[None]
    z = F.normalize(z, dim=-1).requires_grad_(True)
    pairs = int(((zl > 0).sum(1) * zl.shape[1]).sum())
    rss0 = _rss_mb()
    total, units = local_supcon_parts(z, zl, 0.1, "code", int(chunk), blocks=mode == "block")
    (total / units).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    print(json.dumps({"pairs": pairs, "peak_mb": peak}))


def _run(args: argparse.Namespace, kind: str, config: str, size: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--config", config, "--size", str(size), "--data", args.data,
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--device", args.device, "--preset", args.preset]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)  # type: ignore[no-any-return]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"))
    p.add_argument("--preset", default=str(PRESET) if PRESET.is_file() else "", help="config file ('' = defaults)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="default: preset size x1, x2, x4")
    p.add_argument("--batch", type=int, default=None, help="default: the preset's train.batch_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench_semicl")
    p.add_argument("--child", default="")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--config", default="supervised")
    p.add_argument("--loss-chunk", type=int, default=4194304, help="pair_chunk of the loss-only rows")
    args = p.parse_args(argv)
    base_cfg = _config(args.preset, None, [])
    args.batch = args.batch or int(base_cfg.train.batch_size)
    args.sizes = args.sizes or [int(base_cfg.data.image_size) * f for f in (1, 2, 4)]
    if args.child:
        {"memory": child_memory, "time": child_time, "loss": child_loss}[args.child](args)
        return 0
    rows, loss_rows = [], []
    for size in args.sizes:
        times = _run(args, "time", "", size)
        for name in CONFIGS:
            rows.append({"size": size, "config": name, "step_s": times[name], **_run(args, "memory", name, size)})
        for mode in ("stride", "block"):
            for chunk in (args.loss_chunk, 1 << 40):
                r = _run(args, "loss", f"{mode}:{chunk}", size)
                loss_rows.append({"size": size, "mode": mode, "bounded": chunk == args.loss_chunk, **r})
        print(f"measured {size} px", file=sys.stderr, flush=True)
    base = {r["size"]: r for r in rows if r["config"] == "supervised"}
    lines = ["| size | config | s/step | x supervised | peak MB | x supervised |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["size"]]
        r["time_ratio"] = r["step_s"] / b["step_s"]
        r["memory_ratio"] = r["peak_mb"] / max(b["peak_mb"], 1e-9)
        lines.append(f"| {r['size']} | {r['config']} | {r['step_s']:.3f} | {r['time_ratio']:.2f} | "
                     f"{r['peak_mb']:.0f} | {r['memory_ratio']:.2f} |")
    lines += ["", "| size | mode | anchor x member pairs | loss peak MB, pair_chunk bound | unbounded |",
              "|---|---|---|---|---|"]
    for size in args.sizes:
        for mode in ("stride", "block"):
            b, u = (next(r for r in loss_rows if r["size"] == size and r["mode"] == mode and r["bounded"] == f)
                    for f in (True, False))
            lines.append(f"| {size} | {mode} | {b['pairs'] / 1e6:.1f} M | {b['peak_mb']:.0f} | {u['peak_mb']:.0f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"preset": args.preset, "batch": args.batch, "threads": args.threads, "rows": rows,
                    "loss_only": loss_rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
