"""The one fit loop behind `medcl pretrain` and `medcl finetune` (any method, any stage).

It builds the network, the method, optimizer and schedule; iterates step-indexed batches; augments on
the device; calls `training_step` under autocast (CUDA, or bf16 on a CPU with native bf16), the method's backward, averages gradients
over DDP ranks, clips, steps; validates per 3D volume; checkpoints atomically; resumes exactly. The
engine knows the method protocol (core/protocol.py), never a concrete method.

One piece past 300 lines: the step order (autocast, backward, all-reduce, clip, step, EMA hook,
validate, checkpoint, signal handling) is the contract every method relies on, read top to bottom.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from medcl_cli.config import Config, dump_yaml
from medcl_cli.core.protocol import Method, call_backward, on_step_end
from medcl_cli.core.report import Reporter
from medcl_cli.core.runfolder import read_run_info
from medcl_cli.data.augment import make_views
from medcl_cli.data.batches import (
    auto_workers,
    labeled_patients,
    make_loader,
    make_sampler,
    mark_labeled,
)
from medcl_cli.data.dataset import open_slices
from medcl_cli.data.folder import split_summary
from medcl_cli.engine import checkpoint as ckpt_io
from medcl_cli.engine import distributed as D
from medcl_cli.engine.device import (
    autocast,
    describe,
    resolve_device,
    resolve_precision,
)
from medcl_cli.engine.eta import WallEstimate
from medcl_cli.engine.optim import build_optimizer, lr_at, set_lr
from medcl_cli.engine.runs import (
    RunFolder,
    RunReporter,
    check_out,
    clear_run_files,
    now,
)
from medcl_cli.engine.setup import (
    build_method,
    with_input_channels,
    checkpoint_state,
    restore_state,
    resume_rank_rng,
    run_info,
    seed_everything,
    trains_segmentation,
)
from medcl_cli.engine.validation import load_val_cases, validate
from medcl_cli.errors import EXIT_INTERRUPTED, Interrupted, MedclError, UsageError


@dataclass
class FitRequest:
    cfg: Config
    stage: str  # pretrain | finetune
    data: Path
    out: Path
    labeled: str | None = None
    resume: bool = False
    overwrite: bool = False
    init_from: Path | None = None
    command: list[str] = field(default_factory=list)
    dist: D.DistEnv = field(default_factory=D.DistEnv)


@dataclass
class FitResult:
    run_dir: Path
    steps: int
    best: float | None
    last_losses: dict[str, float]
    device: str


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes the current step, flushes last.pt and exits 130."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.set = True

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old.clear()


def fit(req: FitRequest, reporter: Reporter | None = None) -> FitResult:
    """Train `req.cfg.method` for `req.cfg.train.steps` steps into the run folder `req.out`."""
    cfg, env = req.cfg, req.dist
    tcfg = cfg.train
    device = resolve_device(tcfg.device, env.local_rank if env.enabled else None)
    dtype = resolve_precision(tcfg.precision, device)
    D.init(env, device)
    D.run_on_main(env, lambda: check_out(req.out, req.overwrite, req.resume))  # others must not see rank 0's files
    if env.is_main and req.overwrite and not req.resume:
        clear_run_files(req.out)
    D.barrier(env)
    run = RunFolder(req.out, active=env.is_main)
    rep = RunReporter(reporter, run, active=env.is_main)
    stop = _StopFlag()
    stop.install()
    t0 = time.perf_counter()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _fit(req, run, rep, stop, device, dtype, t0)
    except Interrupted:
        raise
    except MedclError as exc:
        run.finish("failed", exc.exit_code, error=exc.message)
        raise
    except BaseException as exc:
        run.finish("failed", 1, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stop.restore()
        torch.use_deterministic_algorithms(deterministic_before)


def _fit(
    req: FitRequest, run: RunFolder, rep: RunReporter, stop: _StopFlag, device: torch.device, dtype: torch.dtype, t0: float
) -> FitResult:
    cfg, env, tcfg = req.cfg, req.dist, req.cfg.train
    if tcfg.batch_size % env.world:
        raise UsageError(f"--batch-size {tcfg.batch_size} is not divisible by {env.world} processes")
    seed_everything(tcfg.seed, tcfg.deterministic, rep)
    rep.log(f"device: {describe(device)}, precision: {str(dtype).replace('torch.', '')}, processes: {env.world}")
    t_cache = time.perf_counter()
    # the first process of every machine builds (atomic rename: a shared file system is fine)
    slices = open_slices(req.data, cfg.data, rep, builder=env.local_rank == 0, barrier=lambda: D.barrier(env))
    t_cache = time.perf_counter() - t_cache
    patients = labeled_patients(slices, req.labeled, tcfg.seed)
    if req.resume and (req.out / "run.json").is_file():  # the resumed run keeps its labelled set
        patients = read_run_info(req.out).get("labeled_patients", patients)
    mark_labeled(slices, patients)
    cfg = with_input_channels(cfg, slices, rep)
    method, info = build_method(cfg, req.stage, slices, env, device, req.init_from, rep)
    opt = build_optimizer(method, cfg.optim)
    scaler = torch.amp.GradScaler("cuda", enabled=(device.type == "cuda" and dtype == torch.float16))
    start, best = 0, None
    if req.resume:
        state = ckpt_io.load(req.out / "checkpoints" / "last.pt", map_location="cpu")
        start, best = restore_state(state, method, opt, scaler, device)
        rep.log(f"resuming {req.out} at step {start}")
    if not req.resume:
        torch.manual_seed(D.rank_seed(tcfg.seed, env.rank))
    elif env.enabled:  # restore_state set rank 0's generators; each rank takes back its own
        resume_rank_rng(state.get("rng_ranks"), env, D.rank_seed(tcfg.seed, env.rank) + start)
    needs = set(getattr(method, "needs", {"labeled"}))
    n_views = int(getattr(method, "n_views", 1))
    mix = getattr(method, "labeled_fraction", None)  # a method may set its own labelled share (arco)
    mix = tcfg.labeled_fraction_per_batch if mix is None else float(mix)
    sampler = make_sampler(slices, needs, tcfg.batch_size, mix, tcfg.seed, env.rank, env.world, start, tcfg.steps)
    workers = auto_workers(cfg.data.num_workers, device.type)
    loader = make_loader(slices, sampler, workers, pin=device.type == "cuda")
    loader.generator = torch.Generator().manual_seed(tcfg.seed)  # keep the global RNG untouched
    # a method validates when it trains the segmentation head on masks; semicl uses masks for its local
    # contrast only (`validates = False`), so a Dice of its untrained head would pick a meaningless best.pt
    validates = trains_segmentation(method)
    val_cases = load_val_cases(slices, "val", cfg.data.resize) if (validates and env.is_main) else []
    run.start(
        run_info(req, device, dtype, slices, patients, info, workers, t_cache, validates),
        dump_yaml(cfg),
        start if req.resume else None,
    )
    run.event("start", step=start, steps=tcfg.steps)
    mix_note = " ({} labelled + {} unlabelled)".format(*sampler.counts) if len(sampler.counts) == 2 else ""
    rep.log(
        f"{req.stage} {cfg.method}: {tcfg.steps} steps, batch {tcfg.batch_size}{mix_note}, "
        f"{len(patients)} labelled patient(s), {int(slices.split_mask('train').sum())} training slices"
    )
    rep.log(f"splits: {split_summary(slices.folder.split_counts())}")
    local_rows = torch.from_numpy(sampler.local_rows())
    timers = {"data": 0.0, "step": 0.0, "val": 0.0, "t0": t0, "wall0": 0.0, "train0": 0.0}
    if req.resume:  # wall and training seconds continue from the killed run's last checkpoint
        timers["wall0"] = float(run.info.get("wall_s", 0.0))
        timers["train0"] = float(run.info.get("train_s", 0.0))
    last: dict[str, float] = {}
    step = start
    rep.start(req.stage, tcfg.steps)
    if start:
        rep.advance(req.stage, start)
    tick = time.perf_counter()
    eta = WallEstimate(start, tcfg.steps)
    for t, batch in zip(range(start, tcfg.steps), loader):
        batch = _to_device(batch, device)
        gen = torch.Generator().manual_seed(int(tcfg.seed) * 1_000_003 + t)
        batch = make_views(batch, n_views, cfg.augment, gen, rows=local_rows, total=tcfg.batch_size)
        if device.type == "cuda":
            for k in [k for k in batch if k.startswith("image")]:
                batch[k] = batch[k].contiguous(memory_format=torch.channels_last)
        t_data = time.perf_counter()
        timers["data"] += t_data - tick
        set_lr(opt, lr_at(t, tcfg.steps, cfg.optim))
        with autocast(device, dtype):
            losses = cast(Method, method).training_step(batch)  # build_method returns a Method
        if "loss" not in losses:
            raise MedclError(f"method '{cfg.method}' returned no 'loss' at step {t + 1}", "this is a bug in the method")
        parts = {k: v for k, v in losses.items() if torch.is_tensor(v) and v.numel() == 1}
        vec = torch.stack([v.detach().float().reshape(()) for v in parts.values()] + [torch.tensor(float(stop.set), device=device)])
        if env.enabled:
            torch.distributed.all_reduce(vec)
            vec[:-1] /= env.world
        values = dict(zip(parts, vec[:-1].tolist()))
        if not all(np.isfinite(v) for v in values.values()):
            bad = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise MedclError(
                f"non-finite loss at step {t + 1} ({bad})",
                "lower --lr, keep train.grad_clip > 0, or use --set train.precision=fp32",
            )
        scaled = {k: (scaler.scale(v) if torch.is_tensor(v) and v.requires_grad else v) for k, v in losses.items()}
        call_backward(method, scaled)
        D.average_gradients(method.parameters(), env.world)
        scaler.unscale_(opt)
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in method.parameters() if p.grad is not None], tcfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        on_step_end(method, t)
        step = t + 1
        tick = time.perf_counter()
        timers["step"] += tick - t_data
        last = values
        if step % max(tcfg.log_every, 1) == 0 or step == tcfg.steps or step == start + 1:
            for k, v in values.items():
                run.metric(step, "train", k, v)
            run.metric(step, "train", "lr", opt.param_groups[0]["lr"])
        rep.advance(req.stage, 1, loss=values["loss"])
        if (line := eta.observe(step)) is not None:
            rep.log(line)
        # under DDP every rank stops at the same step (the flag travelled with the loss all-reduce)
        stopping = bool(vec[-1].item() > 0) or (not env.enabled and stop.set)
        end = step == tcfg.steps
        if validates and (end or (tcfg.val_every > 0 and step % tcfg.val_every == 0)):
            best = _validate(method, slices, val_cases, device, dtype, run, rep, step, best, cfg, opt, scaler, req, env, timers)
        if stopping or end or step % max(tcfg.checkpoint_every, 1) == 0:
            _save_last(run, env, method, opt, scaler, step, best, cfg, req, slices, _clock(timers))
        if stopping:
            rep.finish(req.stage)
            run.finish("interrupted", EXIT_INTERRUPTED, steps_done=step, timings=_timings(timers, step - start, t0))
            raise Interrupted(
                f"training stopped at step {step}; {req.out / 'checkpoints' / 'last.pt'} saved",
                f"continue with: medcl {req.stage} --resume {req.out}",
            )
    rep.finish(req.stage)
    if step == start:  # nothing to do (already at the requested number of steps): still leave a checkpoint
        _save_last(run, env, method, opt, scaler, step, best, cfg, req, slices, _clock(timers))
    timings = _timings(timers, step - start, t0)
    run.finish("completed", 0, steps_done=step, timings=timings)
    D.barrier(env)
    return FitResult(req.out, step, best, last, str(device))


def _timings(timers: dict[str, float], n: int, t0: float) -> dict[str, float]:
    n = max(n, 1)
    return {
        "total_s": round(time.perf_counter() - t0, 3),
        "data_s_per_step": round(timers["data"] / n, 5),
        "train_s_per_step": round(timers["step"] / n, 5),
        "validation_s": round(timers["val"], 3),
    }


def _clock(timers: dict[str, float]) -> dict[str, float]:
    """Seconds since the run began, over every resumed segment: wall clock (setup and validation included)
    and training alone (data + step)."""
    return {
        "wall_s": round(timers["wall0"] + time.perf_counter() - timers["t0"], 3),
        "train_s": round(timers["train0"] + timers["data"] + timers["step"], 3),
    }


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {kk: vv.to(device, non_blocking=nb) for kk, vv in v.items()}
        else:
            out[k] = v.to(device, non_blocking=nb)
    return out


def _save_last(run: RunFolder, env: D.DistEnv, method: Any, opt: Any, scaler: Any, step: int, best: Any, cfg: Config, req: FitRequest, slices: Any, clock: dict[str, float]) -> None:
    # under DDP, every rank's generators (a collective: all ranks call it), so a resume continues each stream
    rngs = D.gather_objects(env, ckpt_io.rng_state()) if env.enabled else None
    if env.is_main:
        state = checkpoint_state(method, opt, scaler, step, best, cfg, req.stage, slices, True, run.info.get("data_profile"))
        if rngs is not None:
            state["rng_ranks"] = rngs
        ckpt_io.save(run.ckpt_dir / "last.pt", state)
        run.flush()
        run.event("checkpoint", step=step, file="checkpoints/last.pt")
        run.info.update(steps_done=step, updated=now(), **clock)
        run.save_info()
    D.barrier(env)


def _validate(method: Any, slices: Any, val_cases: list[Any], device: torch.device, dtype: torch.dtype, run: RunFolder, rep: RunReporter, step: int, best: float | None, cfg: Config, opt: Any, scaler: Any, req: FitRequest, env: D.DistEnv, timers: dict[str, float]) -> float | None:
    if env.is_main and val_cases:
        from medcl_cli.core.protocol import eval_net

        tv = time.perf_counter()
        scores = validate(eval_net(method), slices, val_cases, device, dtype, batch=max(cfg.train.batch_size, 16))
        timers["val"] += time.perf_counter() - tv
        for k, v in scores.items():
            run.metric(step, "val", k, v)
        for k, v in _clock(timers).items():  # learning curves against time (split "time": not plotted as Dice)
            run.metric(step, "time", k, v)
        dice = scores.get("val_dice", float("nan"))
        improved = np.isfinite(dice) and (best is None or dice > best)
        rep.log(f"step {step}: val_dice {dice:.4f}" + (" (best)" if improved else ""))
        run.event("validation", step=step, **scores)
        if improved:
            best = float(dice)
            state = checkpoint_state(method, opt, scaler, step, best, cfg, req.stage, slices, False, run.info.get("data_profile"))
            ckpt_io.save(run.ckpt_dir / "best.pt", state)
            run.info["best"] = {"metric": "val_dice", "value": best, "step": step}
    if env.enabled:
        b = torch.tensor([float("nan") if best is None else best], device=device)  # nccl: CUDA tensors only
        torch.distributed.broadcast(b, src=0)
        best = None if np.isnan(b.item()) else float(b.item())
    return best
