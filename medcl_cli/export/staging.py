"""Export a medcl dataset folder to the layouts nnU-Net v2 and MONAI read, so moving on costs nothing.

- `nnunet`: a raw dataset `DatasetXXX_Name/` as nnU-Net v2 documents it (dataset_format.md):
  `dataset.json` (channel_names, labels name -> int, numTraining, file_ending), `imagesTr/<case>_0000<ext>`
  (and `_0001`, ... for the further channels of a multi-channel dataset, named in channel_names),
  `labelsTr/<case><ext>` for the labelled train/val cases, `imagesTs/` (and `labelsTs/`, which nnU-Net
  ignores) for the test split, and `splits_final.json` (nnU-Net's list-of-folds format) holding the
  dataset's own train/val split as fold 0. nnU-Net reads that file from its *preprocessed* folder; the
  exporter writes it beside dataset.json and the command says where to copy it.
- `monai`: a Medical Segmentation Decathlon style datalist (`datalist.json` with training / validation /
  test lists, paths relative to the JSON) plus `images/` and `labels/`, readable by
  `monai.data.load_decathlon_datalist` (monai_datalist.py; nnunet.py writes the nnU-Net layout; this module holds the shared file handling).

Files are hard-linked when the output is on the same file system (no extra space) and copied otherwise;
the dataset folder is only read. Unlabelled train/val cases have no place in either layout's training
lists: nnU-Net gets nothing of them, MONAI gets them under an extra `unlabeled` key. The output appears
atomically: everything is written into a hidden temporary folder that is renamed at the end.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medcl_cli.core.files import make_tempdir
from medcl_cli.data.folder import DatasetFolder
from medcl_cli.errors import InvalidDataError, OutputError

# nnU-Net normalises "CT" channels with dataset-wide HU statistics and everything else per image (z-score)


@dataclass
class ExportResult:
    """What an export wrote: the folder (or datalist file) and case counts per destination."""

    format: str
    path: Path  # DatasetXXX_Name/ (nnunet) or the output folder (monai)
    datalist: Path | None = None  # monai: the datalist JSON
    counts: dict[str, int] = field(default_factory=dict)
    linked: int = 0  # files hard-linked
    copied: int = 0  # files copied (other file system)
    skipped_unlabeled: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)


def place_file(src: Path, dst: Path, result: ExportResult, copy: bool) -> None:
    """Hard-link `src` to `dst` (copy when asked or across file systems); never touches `src`."""
    if not src.is_file():
        raise InvalidDataError(f"file listed in cases.csv is missing: {src}", "re-run medcl ingest")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.link(src, dst)
            result.linked += 1
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)  # not copy2: the copy takes the umask's mode, not the source's
    result.copied += 1


def prepare_target(target: Path, overwrite: bool) -> Path:
    """A fresh hidden temporary folder beside `target`; refuses an existing target without overwrite."""
    if target.exists() and not overwrite:
        raise OutputError(f"output exists: {target}", "pass --overwrite to replace it, or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    return make_tempdir(f".tmp-{target.name}-", target.parent)


def commit_target(tmp: Path, target: Path) -> None:
    """Replace `target` by the finished temporary folder (old copy removed only after success)."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def case_groups(ds: DatasetFolder) -> dict[str, pd.DataFrame]:
    """Cases sorted into labelled train, labelled val, test, and unlabelled train/val."""
    c = ds.cases
    has_label = c["label"].astype(str).str.len() > 0
    return {
        "train": c[(c["split"] == "train") & has_label],
        "val": c[(c["split"] == "val") & has_label],
        "test": c[c["split"] == "test"],
        "unlabeled": c[c["split"].isin(["train", "val"]) & ~has_label],
    }


