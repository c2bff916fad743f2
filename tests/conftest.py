"""Shared fixtures. Real data is found through ONE fixture: `shared_data` (env MEDCL_SHARED_DATA,
default ../shared/data beside the repository). Outside CI a missing folder skips with the reason;
under CI=true it fails, never a silent skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "data"


def _shared_root() -> Path:
    return Path(os.environ.get("MEDCL_SHARED_DATA", str(DEFAULT_SHARED))).expanduser().resolve()


@pytest.fixture(scope="session")
def shared_data():
    """A function `shared_data("acdc")` -> Path of that folder under the shared data root."""

    def get(sub: str = "") -> Path:
        path = _shared_root() / sub
        if not path.exists():
            msg = (
                f"shared data folder {path} not found; set MEDCL_SHARED_DATA to the folder that holds "
                "acdc/, tcia_brain_tumor_progression_dicom/, ..."
            )
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg)
            pytest.skip(msg)
        return path

    return get


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run tiny tensors on a shared 2-core machine: one intra-op thread is fastest, and a killed-and-
    resumed subprocess (OMP_NUM_THREADS=1) then runs the same kernels with the same sums as this process."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A synthetic dataset folder (data/synthetic.py): 6 patients x (ED, ES), 7-9 slices of 40 x 48,
    4 classes; patients 1-2 are `val`, 3-6 `train`. Built once per session; treat it as read-only
    (its slice cache lives inside it and is shared by the tests)."""
    from medcl_cli.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "dataset", seed=0)


def make_two_channel_copy(src: Path, dst: Path) -> Path:
    """A copy of a single-channel dataset folder as a 2-channel one (nnU-Net layout, data/channels.py):
    channel 0 = the original image, channel 1 = an inverted, rescaled copy with a smooth bias (another
    "sequence" of the same anatomy). The slice cache is not copied."""
    import json
    import shutil

    import numpy as np
    import pandas as pd
    import SimpleITK as sitk

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".medcl_cache"))
    cases = pd.read_csv(dst / "cases.csv", dtype={"case_id": str, "patient": str, "label": str})
    firsts, seconds = [], []
    for cid, rel in zip(cases["case_id"], cases["image"]):
        img = sitk.ReadImage(str(dst / rel))
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in arr.shape), indexing="ij")
        second = sitk.GetImageFromArray((arr.max() - arr) * 0.5 + 20 * (y + x))
        second.CopyInformation(img)
        (dst / rel).rename(dst / f"images/{cid}_0000.nii.gz")
        sitk.WriteImage(second, str(dst / f"images/{cid}_0001.nii.gz"))
        firsts.append(f"images/{cid}_0000.nii.gz")
        seconds.append(f"images/{cid}_0001.nii.gz")
    cases["image"] = firsts
    cases.insert(2, "image_0001", seconds)
    cases.to_csv(dst / "cases.csv", index=False)
    info = json.loads((dst / "dataset.json").read_text())
    info["channel_names"] = {"0": "T1", "1": "T2"}
    (dst / "dataset.json").write_text(json.dumps(info, indent=2))
    return dst


@pytest.fixture(scope="session")
def tiny_dataset_2ch(tiny_dataset, tmp_path_factory) -> Path:
    """`tiny_dataset` with a second channel per case (make_two_channel_copy); read-only like it."""
    return make_two_channel_copy(tiny_dataset, tmp_path_factory.mktemp("tiny2ch") / "dataset")
