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


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    """Keep torch on the machine's cores without oversubscription in tests."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A synthetic dataset folder (data/synthetic.py): 6 patients x (ED, ES), 7-9 slices of 40 x 48,
    4 classes; patients 1-2 are `val`, 3-6 `train`. Built once per session; treat it as read-only
    (its slice cache lives inside it and is shared by the tests)."""
    from medcl_cli.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "dataset", seed=0)
