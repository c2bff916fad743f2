"""`medcl export`: nnU-Net v2 raw datasets and MONAI decathlon datalists, read back by their own rules.

nnU-Net v2 does not install here without pulling a CUDA build of torch, so the nnU-Net side is checked
against its documented raw format (dataset_format.md): identifiers from `imagesTr/*_0000<ending>`, one
label per identifier in `labelsTr`, `numTraining` equal to that count, labels name -> consecutive int,
same grid for image and label, and `splits_final.json` as a list of {"train", "val"} folds. The MONAI
side uses MONAI's own `load_decathlon_datalist` and `LoadImaged`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medcl_cli.cli.app import app
from medcl_cli.export.nnunet import export_nnunet, nnunet_folder_name
from medcl_cli.export.monai_datalist import export_monai
from medcl_cli.errors import InvalidDataError, OutputError, UsageError

LABELS = {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
# case -> (patient, split, labelled)
CASES = {
    "case_0000": ("p0", "train", True),
    "case_0001": ("p0", "train", False),
    "case_0002": ("p1", "train", True),
    "case_0003": ("p2", "val", True),
    "case_0004": ("p3", "test", True),
    "case_0005": ("p4", "test", False),
}


def make_dataset(root: Path, cases: dict[str, tuple[str, str, bool]] = CASES) -> Path:
    """A minimal dataset folder following medcl_cli/data/folder.py (tiny 3D volumes with a geometry)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows, meta = [], []
    for i, (case, (patient, split, labelled)) in enumerate(cases.items()):
        z = 4 + i % 2
        img = sitk.GetImageFromArray(rng.normal(size=(z, 12, 10)).astype(np.float32))
        img.SetSpacing((1.5, 1.25, 8.0))
        img.SetOrigin((-10.0, 5.0, float(i)))
        sitk.WriteImage(img, str(root / "images" / f"{case}.nii.gz"))
        label = ""
        if labelled:
            lab = sitk.GetImageFromArray(rng.integers(0, 4, size=(z, 12, 10)).astype(np.uint8))
            lab.CopyInformation(img)
            sitk.WriteImage(lab, str(root / "labels" / f"{case}.nii.gz"))
            label = f"labels/{case}.nii.gz"
        rows.append(
            dict(case_id=case, image=f"images/{case}.nii.gz", label=label, patient=patient, split=split,
                 spacing_x=1.5, spacing_y=1.25, spacing_z=8.0, size_x=10, size_y=12, size_z=z,
                 source="nifti", modality="MR")
        )
        meta += [dict(case_id=case, slice=s, slice_position=s / (z - 1)) for s in range(z)]
    pd.DataFrame(rows).to_csv(root / "cases.csv", index=False)
    pd.DataFrame(meta).to_csv(root / "meta.csv", index=False)
    info = {"format_version": 1, "name": "tiny heart", "labels": LABELS, "modality": "MR"}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def read_nnunet_raw(folder: Path) -> dict[str, dict]:
    """nnU-Net v2's documented reading of a raw dataset folder (identifiers from imagesTr)."""
    dj = json.loads((folder / "dataset.json").read_text())
    assert {"channel_names", "labels", "numTraining", "file_ending"} <= set(dj)
    ending = dj["file_ending"]
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    ids: dict[str, list[Path]] = {}
    for p in sorted((folder / "imagesTr").iterdir()):
        m = pattern.fullmatch(p.name)
        assert m, f"{p.name} does not follow CASE_XXXX{ending}"
        ids.setdefault(m.group(1), []).append(p)
    assert len(ids) == dj["numTraining"]
    expected = set(dj["labels"].values())
    assert sorted(expected) == list(range(len(expected))) and dj["labels"]["background"] == 0
    out = {}
    for case, images in ids.items():
        assert len(images) == len(dj["channel_names"])
        label = folder / "labelsTr" / f"{case}{ending}"
        assert label.is_file(), f"no label for {case}"
        img, lab = sitk.ReadImage(str(images[0])), sitk.ReadImage(str(label))
        assert img.GetSize() == lab.GetSize() and np.allclose(img.GetSpacing(), lab.GetSpacing())
        assert np.allclose(img.GetOrigin(), lab.GetOrigin()) and np.allclose(img.GetDirection(), lab.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(lab)).tolist()) <= expected
        out[case] = {"images": images, "label": label}
    return out


def test_nnunet_export_reads_back_as_documented(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "data")
    before = tree_digest(ds)
    res = export_nnunet(ds, tmp_path / "raw", dataset_id=501)
    folder = tmp_path / "raw" / "Dataset501_tiny-heart"
    assert res.path == folder and folder.is_dir()
    cases = read_nnunet_raw(folder)
    assert sorted(cases) == ["case_0000", "case_0002", "case_0003"]  # labelled train/val only
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert dj["channel_names"] == {"0": "MRI"} and dj["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["case_0004_0000.nii.gz", "case_0005_0000.nii.gz"]
    splits = json.loads((folder / "splits_final.json").read_text())
    assert splits == [{"train": ["case_0000", "case_0002"], "val": ["case_0003"]}]
    assert set(splits[0]["train"]) | set(splits[0]["val"]) == set(cases)
    assert res.skipped_unlabeled == ["case_0001"]
    # hard links: same bytes, same inode; the dataset is untouched
    src, dst = ds / "images" / "case_0000.nii.gz", folder / "imagesTr" / "case_0000_0000.nii.gz"
    assert src.stat().st_ino == dst.stat().st_ino and res.linked > 0 and res.copied == 0
    assert tree_digest(ds) == before
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_monai_export_loads_with_monai(tmp_path: Path) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    ds = make_dataset(tmp_path / "data")
    res = export_monai(ds, tmp_path / "monai", copy=True)
    assert res.copied > 0 and res.linked == 0
    train = load_decathlon_datalist(res.datalist, True, "training")
    val = load_decathlon_datalist(res.datalist, True, "validation")
    test = load_decathlon_datalist(res.datalist, False, "test")
    assert [Path(d["image"]).name for d in train] == ["case_0000.nii.gz", "case_0002.nii.gz"]
    assert [d["case_id"] for d in val] == ["case_0003"] and len(test) == 2
    assert all(Path(d["image"]).is_absolute() and Path(d["label"]).is_file() for d in train + val)
    item = LoadImaged(keys=["image", "label"], image_only=True)(train[1])
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labels" / "case_0002.nii.gz")))
    assert tuple(item["label"].shape) == ref.shape[::-1]  # MONAI arrays are (x, y, z)
    assert np.array_equal(np.asarray(item["label"]).transpose(2, 1, 0), ref)
    dl = json.loads(res.datalist.read_text())
    assert dl["labels"] == LABELS and [d["case_id"] for d in dl["unlabeled"]] == ["case_0001"]


def test_refusals(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "data")
    export_nnunet(ds, tmp_path / "raw", dataset_id=7, name="A")
    with pytest.raises(OutputError):
        export_nnunet(ds, tmp_path / "raw", dataset_id=7, name="A")
    with pytest.raises(OutputError, match="same dataset id"):
        export_nnunet(ds, tmp_path / "raw", dataset_id=7, name="B")
    export_nnunet(ds, tmp_path / "raw", dataset_id=7, name="A", overwrite=True)
    with pytest.raises(UsageError):
        nnunet_folder_name(1000, "x")
    unlabelled = make_dataset(tmp_path / "u", {"c0": ("p0", "train", False), "c1": ("p1", "val", False)})
    with pytest.raises(InvalidDataError, match="no labelled"):
        export_nnunet(unlabelled, tmp_path / "raw2")


def test_cli_export_exit_codes(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "data")
    runner = CliRunner()
    out = tmp_path / "monai"
    r = runner.invoke(app, ["export", str(ds), "--format", "monai", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"]["training"] == 2
    r = runner.invoke(app, ["export", str(ds), "--format", "monai", "--out", str(out)])
    assert isinstance(r.exception, OutputError) and r.exception.exit_code == 6
    r = runner.invoke(app, ["export", str(ds), "--format", "nnunett", "--out", str(out)])
    assert isinstance(r.exception, UsageError) and "nnunet" in r.exception.message
