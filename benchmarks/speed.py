"""Training speed and memory of every registered method (benchmark.md section 2).

    python benchmarks/speed.py [--batch-size 8] [--image-size 128] [--steps 10] [--device auto] [--out DIR]
                               [--precision fp32,bf16]

For every method in `medcl_cli.methods.REGISTRY` (a key `METHOD:STAGE` picks a stage; a method with two
stages, arco, is measured in both: `arco` is its first, `arco:finetune` its second): the peak memory
measured in a fresh process per method,
and the median seconds per training step measured with all methods taking turns step by step in one
process (so background load on a shared machine hits every method alike; `--no-interleave` reports the
per-process times instead) (forward + method loss + backward + optimizer)
and the peak memory (RSS on CPU, max allocated on CUDA) at the same batch and image size, and the ratio of
each to `supervised` measured in the same run. Also: the supervised step against a plain MONAI `BasicUNet`
of the same widths trained with the same loss (target: ours at least as fast), the fraction of machine
peak reached by the supervised step (torch.utils.flop_counter FLOPs per second over the FLOP/s of a large
float32 matmul timed in the same run), and the data time per batch (memory-mapped lookup + transfer +
two-view augmentation) against the step time. Prints a Markdown table; writes results.json and
results.md into --out (default benchmarks/results/speed/).

Precision (`--precision`, a comma list of train.precision values; default fp32 and bf16 where the device
computes bf16 natively, else fp32 alone): the first value is the reference of the main table and of the
peak memory; with more than one, every method's step is timed in each precision, all of them taking
turns in the same interleaved loop (the same initial weights, batches and views), and a second table
gives the seconds per step side by side with their ratio to the first precision.
"""

from __future__ import annotations

import argparse
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

HERE = Path(__file__).resolve().parent


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dataset(image_size: int, root: Path) -> Path:
    from medcl_cli.data.synthetic import make_synthetic_dataset

    data = root / f"synthetic-{image_size}"
    if not (data / "dataset.json").is_file():
        side = max(image_size, 48)
        make_synthetic_dataset(data, n_patients=8, n_slices=10, shape_yx=(side, side), val_patients=2, seed=0)
    return data


class Bench:
    """One method (or `basicunet`) built on the benchmark batch; `step(t)` times one training step."""

    def __init__(self, key: str, args: argparse.Namespace, precision: str | None = None) -> None:
        import torch

        from medcl_cli.config import load_config
        from medcl_cli.data.batches import BatchSource, labeled_patients, make_sampler, mark_labeled
        from medcl_cli.data.dataset import open_slices
        from medcl_cli.engine.device import resolve_device, resolve_precision
        from medcl_cli.engine.optim import build_optimizer
        from medcl_cli.engine.setup import data_spec
        from medcl_cli.methods import get_info, load_method_class
        from medcl_cli.methods.losses.segmentation import dice_ce
        from medcl_cli.models.unet import build_unet

        self.key = key
        self.device = resolve_device(args.device)
        method_key, _, stage = ("supervised" if key == "basicunet" else key).partition(":")
        stages = get_info(method_key).stages
        if stage and stage not in stages:
            raise SystemExit(f"{method_key} has no stage '{stage}' (its stages: {', '.join(stages)})")
        self.cfg = load_config(sets=[f"method={method_key}", f"data.image_size={args.image_size}"])
        self.dtype = resolve_precision(precision or args.precisions[0], self.device)
        slices = open_slices(_dataset(args.image_size, Path(args.data_root)), self.cfg.data)
        mark_labeled(slices, labeled_patients(slices, "3", 0))
        spec = data_spec(slices, stage or stages[0])  # as the loop builds it (gcl: auto meta labels)
        torch.manual_seed(0)
        if key == "basicunet":
            from monai.networks.nets import BasicUNet

            c = self.cfg.model.channels
            plain = BasicUNet(2, 1, slices.num_classes, features=(*c, c[0]), norm="batch")  # our norm

            class Plain(torch.nn.Module):
                n_views, needs = 1, {"labeled"}

                def __init__(self) -> None:
                    super().__init__()
                    self.net = plain

                def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
                    return {"loss": dice_ce(self.net(batch["image"]), batch["label"])}

            method: torch.nn.Module = Plain()
        else:
            method = load_method_class(method_key)(build_unet(self.cfg.model, slices.num_classes), self.cfg, spec)
        self.method = method.to(self.device)
        if self.device.type == "cuda":
            self.method = self.method.to(memory_format=torch.channels_last)
        self.opt = build_optimizer(self.method, self.cfg.optim)
        self.n_views = int(getattr(method, "n_views", 1))
        needs = set(getattr(method, "needs", {"labeled"}))
        self.sampler = make_sampler(slices, needs, args.batch_size, 0.5, 0, 0, 1, 0, 10**6)
        self.source = BatchSource(slices)

    def step(self, t: int, count_flops: bool = False) -> tuple[float, float, int | None]:
        """(data seconds, step seconds, FLOPs of forward + backward when counted)."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from medcl_cli.data.augment import make_views
        from medcl_cli.engine.device import autocast
        from medcl_cli.core.protocol import call_backward, on_step_end

        dev = self.device
        t0 = time.perf_counter()
        batch = self.source[self.sampler.local_batch(t)]
        batch = {k: ({kk: vv.to(dev) for kk, vv in v.items()} if isinstance(v, dict) else v.to(dev)) for k, v in batch.items()}
        batch = make_views(batch, self.n_views, self.cfg.augment, torch.Generator().manual_seed(t))
        _sync(dev)
        t1 = time.perf_counter()
        ctx = FlopCounterMode(display=False) if count_flops else None
        if ctx is not None:
            ctx.__enter__()
        with autocast(dev, self.dtype):
            losses = self.method.training_step(batch)
        call_backward(self.method, losses)
        flops = None
        if ctx is not None:
            ctx.__exit__(None, None, None)
            flops = int(ctx.get_total_flops())
        torch.nn.utils.clip_grad_norm_([p for p in self.method.parameters() if p.grad is not None], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        on_step_end(self.method, t)
        _sync(dev)
        return t1 - t0, time.perf_counter() - t1, flops


def measure_one(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Step time, data time and peak memory of method `key` alone in this (fresh) process."""
    import torch

    bench = Bench(key, args)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    step_times, data_times, flops = [], [], None
    for t in range(args.warmup + args.steps):
        d, s, f = bench.step(t, count_flops=key in ("supervised", "basicunet") and t == args.warmup - 1)
        flops = f if f is not None else flops
        if t >= args.warmup:
            step_times.append(s)
            data_times.append(d)
    if bench.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(bench.device) / 2**20
        mem_kind = "cuda max allocated"
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        mem_kind = "rss"
    return {
        "key": key,
        "device": str(bench.device),
        "threads": torch.get_num_threads(),
        "step_s": statistics.median(step_times),
        "data_s": statistics.median(data_times),
        "peak_mb": peak_mb,
        "memory": mem_kind,
        "flops_per_step": flops,
        "n_params": sum(p.numel() for p in bench.method.parameters()),
    }


def interleaved(keys: list[str], args: argparse.Namespace) -> dict[tuple[str, str], tuple[float, float]]:
    """Median (step, data) seconds per (method, precision), all of them in one process taking turns step
    by step, so load from other processes on a shared machine hits every one alike (ratios stay meaningful)."""
    benches = {(k, p): Bench(k, args, p) for k in keys for p in args.precisions}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {kp: [] for kp in benches}
    for t in range(args.warmup + args.steps):
        for kp, b in benches.items():
            d, s, _ = b.step(t)
            if t >= args.warmup:
                times[kp].append((s, d))
    return {kp: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for kp, v in times.items()}


def precisions(spec: str, device_spec: str) -> list[str]:
    """The train.precision values to time: `spec` (comma list), or fp32 + bf16 where bf16 is native."""
    import torch

    from medcl_cli.engine.device import resolve_device, resolve_precision
    from medcl_cli.errors import UsageError

    device = resolve_device(device_spec)
    if not spec:
        native = device.type == "cuda" or resolve_precision("auto", device) == torch.bfloat16
        return ["fp32", "bf16"] if native else ["fp32"]
    out = [p.strip() for p in spec.split(",") if p.strip()]
    for p in out:
        try:
            resolve_precision(p, device)
        except UsageError as exc:
            raise SystemExit(f"--precision {p}: {exc.message}") from None
    return out


def matmul_peak(device_spec: str) -> float:
    """FLOP/s of a large float32 matmul on the device (best of a few runs)."""
    import torch

    from medcl_cli.engine.device import resolve_device

    device = resolve_device(device_spec)
    n = 4096 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        t = time.perf_counter()
        (a @ b).sum().item()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per method (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", default="", help="comma-separated keys (default: every registered method)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "speed")
    p.add_argument("--data-root", default=str(Path(tempfile.gettempdir()) / "medcl-bench"))
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="report the isolated per-process step times instead of the interleaved ones")
    p.add_argument("--precision", default="", help="comma list of train.precision values, the first the "
                   "reference (default: fp32,bf16 where bf16 is native, else fp32)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: measure one key, print JSON
    args = p.parse_args(argv)
    args.precisions = precisions(args.precision, args.device)
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return 0

    from medcl_cli.methods import REGISTRY, get_info

    # a method with two stages (arco) is measured in both: `arco` is its first, `arco:finetune` its second
    every = [f"{k}:{s}" if i else k for k in REGISTRY for i, s in enumerate(get_info(k).stages)]
    keys = [k for k in args.methods.split(",") if k] or every
    # supervised is measured first and last (the reference; the faster of the two counts, which damps
    # the effect of other load on a shared machine)
    keys = ["supervised"] + [k for k in keys if k != "supervised"] + ["basicunet", "supervised"]
    _dataset(args.image_size, Path(args.data_root))  # built once, outside the timed processes
    rows: dict[str, dict[str, Any]] = {}
    for key in keys:
        cmd = [sys.executable, __file__, "--one", key, "--batch-size", str(args.batch_size), "--image-size",
               str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device",
               args.device, "--data-root", args.data_root, "--precision", args.precisions[0]]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if res.returncode != 0:
            print(f"{key}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            rows[key] = {"key": key, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{key}: {row['step_s']:.4f} s/step", file=sys.stderr)
        if key in rows and "step_s" in rows[key]:
            row["repeats_s"] = [rows[key]["step_s"], row["step_s"]]
            if rows[key]["step_s"] < row["step_s"]:
                row = {**rows[key], "repeats_s": row["repeats_s"]}
        rows[key] = row
    ok = [k for k, r in rows.items() if "step_s" in r]
    ref = args.precisions[0]
    if args.interleave and ok:
        timed = interleaved(ok, args)
        for k in ok:
            rows[k]["isolated_step_s"], rows[k]["isolated_data_s"] = rows[k]["step_s"], rows[k]["data_s"]
            rows[k]["step_s"], rows[k]["data_s"] = timed[(k, ref)]
            if len(args.precisions) > 1:
                rows[k]["precision_step_s"] = {p: timed[(k, p)][0] for p in args.precisions}
                rows[k]["precision_ratio"] = {p: timed[(k, p)][0] / timed[(k, ref)][0] for p in args.precisions}
    peak = matmul_peak(args.device)
    sup = rows.get("supervised", {})
    for r in rows.values():
        if "step_s" in r and "step_s" in sup:
            r["time_ratio"] = r["step_s"] / sup["step_s"]
            r["memory_ratio"] = r["peak_mb"] / sup["peak_mb"]
    summary = {
        "timing": "interleaved in one process" if args.interleave else "one process per method",
        "precisions": args.precisions,
        "threads": sup.get("threads"),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "device": sup.get("device"),
        "matmul_flops_per_s": peak,
        "methods": rows,
    }
    if sup.get("flops_per_step"):
        summary["supervised_flops_per_s"] = sup["flops_per_step"] / sup["step_s"]
        summary["fraction_of_peak"] = summary["supervised_flops_per_s"] / peak
    if "step_s" in rows.get("basicunet", {}) and "step_s" in sup:
        summary["supervised_vs_basicunet"] = sup["step_s"] / rows["basicunet"]["step_s"]
    md = render(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "results.md").write_text(md)
    print(md)
    return 0


def render(s: dict[str, Any]) -> str:
    lines = [
        f"Training step, batch {s['batch_size']}, {s['image_size']} x {s['image_size']} px, device {s['device']} "
        f"({(s.get('precisions') or ['fp32'])[0]}, torch threads: {s.get('threads')}); "
        f"step times {s['timing']}, peak memory one process per method",
        "",
        "| method | s / step | x supervised | peak MB | x supervised | data s / batch | data / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in s["methods"].items():
        if "step_s" not in r:
            lines.append(f"| {k} | failed: {r.get('error', '')} | | | | | |")
            continue
        lines.append(
            f"| {k} | {r['step_s']:.4f} | {r.get('time_ratio', float('nan')):.2f} | {r['peak_mb']:.0f} "
            f"| {r.get('memory_ratio', float('nan')):.2f} | {r['data_s']:.4f} | {r['data_s'] / r['step_s']:.2f} |"
        )
    lines.append("")
    if "supervised_vs_basicunet" in s:
        lines.append(f"supervised step / MONAI BasicUNet step (same widths, same loss): {s['supervised_vs_basicunet']:.2f}")
    precs = s.get("precisions", [])
    timed = {k: r for k, r in s["methods"].items() if "precision_step_s" in r}
    if len(precs) > 1 and timed:
        ref = precs[0]
        lines += [
            "",
            f"Precision: seconds per step of each method in {', '.join(precs)} (interleaved, same batches), "
            f"and the ratio to {ref}",
            "",
            "| method | " + " | ".join(f"{p} s / step" for p in precs) + " | "
            + " | ".join(f"{p} / {ref}" for p in precs[1:]) + " |",
            "|---|" + "---|" * (2 * len(precs) - 1),
        ]
        for k, r in timed.items():
            cells = [f"{r['precision_step_s'][p]:.4f}" for p in precs] + [f"{r['precision_ratio'][p]:.2f}" for p in precs[1:]]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    if "fraction_of_peak" in s:
        lines.append(
            f"supervised step: {s['supervised_flops_per_s'] / 1e9:.2f} GFLOP/s = {100 * s['fraction_of_peak']:.1f} % "
            f"of a float32 matmul's {s['matmul_flops_per_s'] / 1e9:.2f} GFLOP/s"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
