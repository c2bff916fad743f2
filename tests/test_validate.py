"""`medcl validate` finds every problem of a damaged dataset folder at once (exit 4), none in a good one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk

from medcl_cli.config import IngestConfig
from medcl_cli.data.ingest import IngestRequest, ingest
from medcl_cli.data.validate import validate_dataset
from test_ingest_phi import cli


def _dataset(tmp):
    (tmp / "img").mkdir()
    (tmp / "lab").mkdir()
    for i in range(4):
        img = sitk.GetImageFromArray(np.random.default_rng(i).random((5, 8, 8)).astype(np.float32))
        img.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(img, str(tmp / "img" / f"c{i}.nii.gz"))
        lab = sitk.GetImageFromArray((np.arange(5 * 8 * 8).reshape(5, 8, 8) % 3).astype(np.uint8))
        lab.CopyInformation(img)
        sitk.WriteImage(lab, str(tmp / "lab" / f"c{i}.nii.gz"))
    ingest(IngestRequest([tmp / "img"], tmp / "ds", labels_dir=tmp / "lab", cfg=IngestConfig(workers=1)))
    return tmp / "ds"


def test_good_dataset_has_no_problems(tmp_path, capsys):
    ds = _dataset(tmp_path)
    res = validate_dataset(ds)
    assert res.ok and res.cases == 4
    r = cli(capsys, "validate", str(ds))
    assert r.exit_code == 0 and "no problems" in r.stdout


def test_every_problem_listed(tmp_path, capsys):
    ds = _dataset(tmp_path)
    (ds / "images" / "c0.nii.gz").unlink()  # missing file
    lab = sitk.ReadImage(str(ds / "labels" / "c1.nii.gz"))  # label value not in dataset.json
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(ds / "labels" / "c1.nii.gz"))
    img = sitk.ReadImage(str(ds / "images" / "c2.nii.gz"))  # NaN voxel and a label on another grid
    arr = sitk.GetArrayFromImage(img)
    arr[1, 2, 3] = np.nan
    nan = sitk.GetImageFromArray(arr)
    nan.CopyInformation(img)
    sitk.WriteImage(nan, str(ds / "images" / "c2.nii.gz"))
    lab = sitk.ReadImage(str(ds / "labels" / "c3.nii.gz"))
    lab.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(lab, str(ds / "labels" / "c3.nii.gz"))
    cases = pd.read_csv(ds / "cases.csv", keep_default_na=False)
    cases.loc[cases["case_id"] == "c1", "split"] = "holdout"
    cases.to_csv(ds / "cases.csv", index=False)
    meta = pd.read_csv(ds / "meta.csv")
    meta[~((meta["case_id"] == "c2") & (meta["slice"] == 4))].to_csv(ds / "meta.csv", index=False)
    res = validate_dataset(ds)
    found = {(p.case_id, p.check) for p in res.problems}
    assert found == {("c0", "image"), ("c1", "label"), ("c1", "split"), ("c2", "voxels"), ("c2", "meta"),
                     ("c3", "label")}
    r = cli(capsys, "validate", str(ds))
    assert r.exit_code == 4 and "6 problem(s)" in r.stderr and "hint:" in r.stderr
    assert "holdout" in r.stdout and "NaN" in r.stdout


def test_not_a_dataset(tmp_path, capsys):
    r = cli(capsys, "validate", str(tmp_path / "nope"))
    assert r.exit_code == 3
    (tmp_path / "empty").mkdir()
    r = cli(capsys, "validate", str(tmp_path / "empty"))
    assert r.exit_code == 4 and "dataset.json" in r.stderr
