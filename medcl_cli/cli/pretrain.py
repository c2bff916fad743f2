"""`medcl pretrain`: contrastive (self- or semi-supervised) pretraining of the segmentation network."""

from __future__ import annotations

from medcl_cli.cli import train_options as T
from medcl_cli.cli.options import ConfigOpt, DeviceOpt, OverwriteOpt, SeedOpt, SetOpt


def pretrain(
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
    """Pretrain with a contrastive method (--method gcl | semicl | simclr | arco ...; see medcl info) on the
    training slices; semi-supervised methods also use the masks of --labeled N|FILE|all. Writes a run folder
    whose weights `medcl finetune --init-from` starts from; prints the run folder on stdout.

    Example: medcl pretrain --data data/ --method gcl --steps 2000 --out runs/gcl
    """
    T.run_training("pretrain", dict(locals()))
