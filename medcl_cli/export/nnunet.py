"""`medcl export --format nnunet`: a raw dataset `DatasetXXX_Name/` as nnU-Net v2 documents it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.folder import DatasetFolder, open_dataset
from medcl_cli.data.io import VOLUME_SUFFIXES
from medcl_cli.errors import InvalidDataError, OutputError, UsageError
from medcl_cli.export.staging import (
    ExportResult,
    case_groups,
    commit_target,
    place_file,
    prepare_target,
)


def nnunet_folder_name(dataset_id: int, name: str) -> str:
    """`Dataset501_Name`: nnU-Net's folder naming (three-digit id, name without separators)."""
    if not 1 <= dataset_id <= 999:
        raise UsageError(f"--dataset-id must be 1..999, found {dataset_id}", "nnU-Net ids have three digits; 500+ is free")
    clean = re.sub(r"[^A-Za-z0-9-]+", "", name.replace(" ", "-").replace("_", "-"))
    if not clean:
        raise UsageError(f"dataset name '{name}' has no usable characters", "pass --name with letters or digits")
    return f"Dataset{dataset_id:03d}_{clean}"


def export_nnunet(
    dataset: str | Path,
    out: str | Path,
    dataset_id: int = 501,
    name: str | None = None,
    overwrite: bool = False,
    copy: bool = False,
    reporter: Reporter | None = None,
) -> ExportResult:
    """Write `OUT/DatasetXXX_Name/` (nnU-Net v2 raw format) from a medcl dataset folder."""
    rep = reporter or NullReporter()
    ds = open_dataset(dataset)
    ending = _file_ending(ds)
    labels = _label_map(ds)
    folder = nnunet_folder_name(dataset_id, name or str(ds.info.get("name") or ds.root.name))
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file", "give the nnUNet_raw folder (created when missing)")
    clash = [p.name for p in out_dir.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder] if out_dir.is_dir() else []
    if clash:
        raise OutputError(
            f"{out_dir} already holds {clash[0]} with the same dataset id {dataset_id}",
            "nnU-Net refuses ambiguous ids; pass another --dataset-id",
        )
    target = out_dir / folder
    groups = case_groups(ds)
    if groups["train"].empty and groups["val"].empty:
        raise InvalidDataError(
            f"{ds.root} has no labelled train/val case; an nnU-Net dataset needs at least one",
            "add masks at ingest (labels/), or export --format monai for unlabelled data",
        )
    result = ExportResult(format="nnunet", path=target, skipped_unlabeled=list(groups["unlabeled"]["case_id"]))
    tmp = prepare_target(target, overwrite)
    try:
        training = pd.concat([groups["train"], groups["val"]])
        rep.start("export", len(training) + len(groups["test"]))
        for row in training.itertuples():
            for k, src in enumerate(ds.channel_paths(str(row.case_id))):
                place_file(src, tmp / "imagesTr" / f"{row.case_id}_{k:04d}{ending}", result, copy)
            place_file(ds.root / str(row.label), tmp / "labelsTr" / f"{row.case_id}{ending}", result, copy)
            rep.advance("export")
        for row in groups["test"].itertuples():
            for k, src in enumerate(ds.channel_paths(str(row.case_id))):
                place_file(src, tmp / "imagesTs" / f"{row.case_id}_{k:04d}{ending}", result, copy)
            if isinstance(row.label, str) and row.label:
                place_file(ds.root / row.label, tmp / "labelsTs" / f"{row.case_id}{ending}", result, copy)
            rep.advance("export")
        rep.finish("export")
        modality = str(ds.info.get("modality") or "").upper()
        dataset_json = {
            "channel_names": ({str(k): n for k, n in enumerate(ds.channel_names)} if ds.num_channels > 1
                              else {"0": _NNUNET_CHANNEL.get(modality, modality or "image")}),
            "labels": {n: int(v) for v, n in sorted(labels.items())},
            "numTraining": int(len(training)),
            "file_ending": ending,
            "name": folder.split("_", 1)[1],
            "description": f"exported by medcl from {ds.root.name} (fingerprint {ds.fingerprint()})",
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n", encoding="utf-8")
        splits = [{"train": list(groups["train"]["case_id"]), "val": list(groups["val"]["case_id"])}]
        (tmp / "splits_final.json").write_text(json.dumps(splits, indent=2) + "\n", encoding="utf-8")
        commit_target(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    result.counts = {"imagesTr": len(training), "imagesTs": len(groups["test"]), "unlabeled_skipped": len(groups["unlabeled"])}
    if result.skipped_unlabeled:
        rep.log(
            f"{len(result.skipped_unlabeled)} unlabelled train/val case(s) left out: nnU-Net trains on labelled cases only",
            "warning",
        )
    result.next_steps = [
        f"export nnUNet_raw={out_dir.resolve()}",
        f"nnUNetv2_plan_and_preprocess -d {dataset_id} --verify_dataset_integrity",
        f"cp {target / 'splits_final.json'} $nnUNet_preprocessed/{folder}/   # medcl's train/val split as fold 0",
        f"nnUNetv2_train {dataset_id} 2d 0",
    ]
    return result


_NNUNET_CHANNEL = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "PT": "PET", "PET": "PET"}


def _file_ending(ds: DatasetFolder) -> str:
    """The one file ending of every image and label (nnU-Net needs a single `file_ending`)."""
    endings: set[str] = set()
    for col in ("image", "label"):
        for rel in ds.cases[col]:
            if not isinstance(rel, str) or not rel:
                continue
            low = rel.lower()
            match = [s for s in VOLUME_SUFFIXES if low.endswith(s)]
            if not match:
                raise InvalidDataError(
                    f"{ds.root / rel} has no known volume suffix ({', '.join(VOLUME_SUFFIXES)})",
                    "re-run medcl ingest to rewrite the dataset",
                )
            endings.add(match[0])
    if len(endings) != 1:
        raise InvalidDataError(
            f"{ds.root} mixes file types {sorted(endings)}; nnU-Net needs one file_ending",
            "re-run medcl ingest so every volume is written as .nii.gz",
        )
    return endings.pop()


def _label_map(ds: DatasetFolder) -> dict[int, str]:
    """The label map, checked to be 0 = background and consecutive (nnU-Net's requirement)."""
    labels = ds.labels
    if sorted(labels) != list(range(len(labels))) or 0 not in labels:
        raise InvalidDataError(
            f"label values {sorted(labels)} in {ds.root / 'dataset.json'} are not consecutive from 0",
            "nnU-Net needs labels 0..K-1; remap the masks and re-run medcl ingest",
        )
    names = list(labels.values())
    if len(set(names)) != len(names):
        raise InvalidDataError(f"duplicate label names in {ds.root / 'dataset.json'}: {names}", "give each label its own name")
    return labels
