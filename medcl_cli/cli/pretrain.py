"""`medcl pretrain`: contrastive (self- or semi-supervised) pretraining of the segmentation network."""

from __future__ import annotations

from medcl_cli.cli.train_options import training_command

pretrain = training_command(
    "pretrain",
    """Pretrain with a contrastive method (--method gcl | semicl | simclr | arco ...; see medcl info) on the
    training slices; semi-supervised methods also use the masks of --labeled N|FILE|all. Writes a run folder
    whose weights `medcl finetune --init-from` starts from; prints the run folder on stdout.

    Example: medcl pretrain --data data/ --method gcl --steps 2000 --out runs/gcl
    """,
)
