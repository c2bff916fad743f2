"""`medcl finetune`: train a segmentation network on the labelled slices (optionally from a pretrain run)."""

from __future__ import annotations

from medcl_cli.cli import train_options as T
from medcl_cli.cli.options import ConfigOpt, DeviceOpt, OverwriteOpt, SeedOpt, SetOpt


def finetune(
    data: T.DataOpt = None,
    out: T.OutOpt = None,
    method: T.MethodOpt = None,
    labeled: T.LabeledOpt = None,
    init_from: T.InitFromOpt = None,
    steps: T.StepsOpt = None,
    batch_size: T.BatchOpt = None,
    image_size: T.ImageSizeOpt = None,
    lr: T.LrOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    deterministic: T.DeterministicOpt = False,
    resume: T.ResumeOpt = None,
    overwrite: OverwriteOpt = False,
    nproc_per_node: T.NprocOpt = "1",
) -> None:
    """Fine-tune on the labelled patients (--labeled N|FILE|all, default all) with a fine-tuning method
    (default supervised: Dice + CE). Validates per 3D volume on the `val` split, keeps checkpoints/best.pt
    by validation Dice and checkpoints/last.pt for --resume; prints the run folder on stdout.

    Example: medcl finetune --data data/ --init-from runs/gcl --labeled 3 --out runs/ft
    """
    T.run_training("finetune", dict(locals()))
