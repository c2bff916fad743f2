"""`medcl export --format monai`: a Medical Segmentation Decathlon style datalist for MONAI.

`OUT/datalist.json` holds training / validation / test lists (a multi-channel case's `image` is the list of its
channel files, in channel order, and `modality` names the channels) (paths relative to the JSON, which is what
`monai.data.load_decathlon_datalist` resolves them against) beside `OUT/images/` and `OUT/labels/`.
Labelled train and val cases go to `training` and `validation`, the test split to `test`, and train/val
cases without a mask to an extra `unlabeled` list for semi-supervised pipelines. Files are hard-linked or
copied and the folder appears atomically, as for nnU-Net (staging.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.folder import open_dataset
from medcl_cli.errors import OutputError
from medcl_cli.export.staging import (
    ExportResult,
    case_groups,
    commit_target,
    place_file,
    prepare_target,
)


def export_monai(
    dataset: str | Path,
    out: str | Path,
    overwrite: bool = False,
    copy: bool = False,
    reporter: Reporter | None = None,
) -> ExportResult:
    """Write `OUT/datalist.json` (decathlon datalist) with `OUT/images/` and `OUT/labels/`."""
    rep = reporter or NullReporter()
    ds = open_dataset(dataset)
    labels = ds.labels
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise OutputError(f"--out {target} is a file", "give a folder for datalist.json, images/ and labels/")
    if target.exists() and not any(target.iterdir()):
        target.rmdir()  # an empty folder is not worth refusing
    groups = case_groups(ds)
    result = ExportResult(format="monai", path=target, datalist=target / "datalist.json")
    tmp = prepare_target(target, overwrite)
    try:
        lists: dict[str, list[dict[str, str | list[str]]]] = {"training": [], "validation": [], "test": [], "unlabeled": []}
        keys = {"train": "training", "val": "validation", "test": "test", "unlabeled": "unlabeled"}
        rep.start("export", len(ds.cases))
        for group, key in keys.items():
            for row in groups[group].itertuples():
                names = []
                for src in ds.channel_paths(str(row.case_id)):
                    place_file(src, tmp / "images" / src.name, result, copy)
                    names.append(f"images/{src.name}")
                # several channels: `image` is the list of channel files, which LoadImaged stacks as channels
                item: dict[str, str | list[str]] = {"image": names if len(names) > 1 else names[0]}
                if isinstance(row.label, str) and row.label:
                    lab_name = Path(row.label).name
                    place_file(ds.root / row.label, tmp / "labels" / lab_name, result, copy)
                    item["label"] = f"labels/{lab_name}"
                item["case_id"] = str(row.case_id)
                lists[key].append(item)
                rep.advance("export")
        rep.finish("export")
        modality = str(ds.info.get("modality") or "image")
        datalist: dict[str, object] = {
            "name": str(ds.info.get("name") or ds.root.name),
            "description": f"exported by medcl from {ds.root.name} (fingerprint {ds.fingerprint()})",
            "tensorImageSize": "3D",
            "modality": ({str(k): n for k, n in enumerate(ds.channel_names)} if ds.num_channels > 1
                         else {"0": modality}),
            "labels": {str(k): v for k, v in sorted(labels.items())},
            "numTraining": len(lists["training"]),
            "numTest": len(lists["test"]),
            "training": lists["training"],
            "validation": lists["validation"],
        }
        # monai reads `test` as a list of dicts; an empty list would break load_decathlon_datalist("test")
        for key in ("test", "unlabeled"):
            if lists[key]:
                datalist[key] = lists[key]
        (tmp / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
        commit_target(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    result.counts = {k: len(v) for k, v in lists.items()}
    result.next_steps = [
        f'python -c "from monai.data import load_decathlon_datalist as L; print(len(L(\'{result.datalist}\')))"',
    ]
    return result
