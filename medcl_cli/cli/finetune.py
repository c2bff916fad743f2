"""`medcl finetune`: train a segmentation network on the labelled slices (optionally from a pretrain run)."""

from __future__ import annotations

from medcl_cli.cli.train_options import training_command

finetune = training_command(
    "finetune",
    """Fine-tune on the labelled patients (--labeled N|FILE|all, default all) with a fine-tuning method
    (default supervised: Dice + CE). Validates per 3D volume on the `val` split, keeps checkpoints/best.pt
    by validation Dice and checkpoints/last.pt for --resume; prints the run folder on stdout.

    Example: medcl finetune --data data/ --init-from runs/gcl --labeled 3 --out runs/ft
    """,
)
