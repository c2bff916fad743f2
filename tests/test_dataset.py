"""The slice dataset: cache built once and reused, per-slice keys, labelled patients, meta codes, the
step sampler (deterministic, resumable, DDP shards concatenate to the single-process batch)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medcl_cli.config import DataConfig
from medcl_cli.data.batches import BatchSource, labeled_patients, make_sampler, mark_labeled
from medcl_cli.data.dataset import cache_location, open_slices
from medcl_cli.data.folder import open_dataset
from medcl_cli.data.preprocess import image_slices
from medcl_cli.errors import InputNotFoundError, UsageError

CFG = DataConfig(image_size=32)


def test_cache_built_once_and_matches_preprocess(tiny_dataset):
    s = open_slices(tiny_dataset, CFG)
    assert s.cache_dir.parent == tiny_dataset / ".medcl_cache"
    stamp = os.stat(s.cache_dir / "images.npy").st_mtime_ns
    s2 = open_slices(tiny_dataset, CFG)
    assert os.stat(s2.cache_dir / "images.npy").st_mtime_ns == stamp  # reused, not rebuilt
    assert isinstance(s.images, np.memmap)
    folder = open_dataset(tiny_dataset)
    assert len(s.case) == len(folder.meta)
    cid = folder.cases.case_id.iloc[3]
    ref, _ = image_slices(sitk.GetArrayFromImage(sitk.ReadImage(str(folder.image_path(cid)))), 32)
    rows = s.case_slices(s.case_ids.index(cid))
    assert np.allclose(s.images[rows], ref[:, 0].numpy())
    assert set(np.unique(s.labels)) <= {0, 1, 2, 3}
    assert not [p for p in s.cache_dir.parent.iterdir() if p.name.startswith(".tmp")]


def test_cache_dir_env_and_other_config(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCL_CACHE_DIR", str(tmp_path / "c"))
    folder = open_dataset(tiny_dataset)
    s = open_slices(folder, DataConfig(image_size=24, resize="pad_crop"))
    assert s.cache_dir.parent == tmp_path / "c" and s.images.shape[1:] == (24, 24)
    assert cache_location(folder, "x").parent == tmp_path / "c"


def test_cache_none_is_in_memory_and_leaves_nothing(tiny_dataset, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    s = open_slices(tiny_dataset, DataConfig(image_size=32, cache="none"))
    ref = open_slices(tiny_dataset, CFG)
    assert not isinstance(s.images, np.memmap) and np.array_equal(s.images, ref.images)
    assert list(tmp_path.iterdir()) == []  # the throw-away copy is gone once read


def test_private_tempdir_sweeps_folders_of_dead_processes(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from medcl_cli.core.files import private_tempdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"medcl-predict-{int(gone.stdout)}-abc"  # what a kill -9 leaves behind
    alive = tmp_path / f"medcl-predict-{os.getppid()}-def"  # a running process's folder
    other = tmp_path / f"medcl-slices-{int(gone.stdout)}-ghi"  # another prefix: not ours to sweep
    for d in (dead, alive, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "scan.nii.gz").write_bytes(b"x")
    with private_tempdir("medcl-predict-") as work:
        assert work.is_dir() and work.name.startswith(f"medcl-predict-{os.getpid()}-")
        assert not dead.exists() and alive.exists() and other.exists()
    assert not work.exists()


def test_batch_keys_meta_and_labeled(tiny_dataset):
    s = open_slices(tiny_dataset, CFG)
    pats = labeled_patients(s, "2", seed=1)
    assert len(pats) == 2 and pats == labeled_patients(s, "2", seed=1)
    assert set(pats) <= {"patient003", "patient004", "patient005", "patient006"}
    mark_labeled(s, pats)
    train = np.flatnonzero(s.split_mask("train"))
    idx = train[:: max(len(train) // 8, 1)][:8]
    b = BatchSource(s)[idx]
    assert b["image"].shape == (8, 1, 32, 32) and b["image"].dtype == torch.float32
    assert b["label"].shape == (8, 32, 32) and b["label"].dtype == torch.long
    for i, j in enumerate(idx):
        patient = s.patients[s.case_patient[s.case[j]]]
        assert bool(b["labeled"][i]) == (patient in pats)
        assert (b["label"][i] == -1).all() != (patient in pats)
    assert {"patient", "phase", "group", "slice_part"} <= set(b["meta"])
    assert s.meta_cardinality["phase"] == 2 and s.meta_cardinality["slice_part"] == 3
    parts = b["meta"]["slice_part"].numpy()
    assert np.array_equal(parts, np.minimum((b["slice_position"].numpy() * 3).astype(int), 2))


def test_labeled_file_and_errors(tiny_dataset, tmp_path):
    s = open_slices(tiny_dataset, CFG)
    f = tmp_path / "lab.txt"
    f.write_text("patient004\n\npatient006\n")
    assert labeled_patients(s, str(f), 0) == ["patient004", "patient006"]
    f.write_text("patient001\n")  # a val patient
    with pytest.raises(UsageError):
        labeled_patients(s, str(f), 0)
    with pytest.raises(UsageError):
        labeled_patients(s, "99", 0)
    with pytest.raises(InputNotFoundError):
        labeled_patients(s, str(tmp_path / "missing.txt"), 0)
    assert len(labeled_patients(s, None, 0)) == 4


def test_sampler_deterministic_resumable_and_sharded(tiny_dataset):
    s = open_slices(tiny_dataset, CFG)
    mark_labeled(s, ["patient003"])
    full = make_sampler(s, {"labeled", "unlabeled"}, 8, 0.5, seed=3, rank=0, world=1, start=0, end=20)
    batches = list(full)
    assert all(s.labeled[b[:4]].all() and not s.labeled[b[4:]].any() for b in batches)
    resumed = make_sampler(s, {"labeled", "unlabeled"}, 8, 0.5, seed=3, rank=0, world=1, start=7, end=20)
    assert all(np.array_equal(a, b) for a, b in zip(batches[7:], resumed))
    shards = [list(make_sampler(s, {"unlabeled"}, 8, 0.5, 3, r, 2, 0, 5)) for r in range(2)]
    single = list(make_sampler(s, {"unlabeled"}, 8, 0.5, 3, 0, 1, 0, 5))
    for t in range(5):
        assert np.array_equal(shards[0][t], single[t][0::2]) and np.array_equal(shards[1][t], single[t][1::2])
    # a labelled/unlabelled mix is shared evenly: each rank gets labelled and unlabelled slices
    mix = [make_sampler(s, {"labeled", "unlabeled"}, 8, 0.5, 3, r, 2, 0, 1).local_batch(0) for r in range(2)]
    assert all(s.labeled[m].sum() == 2 for m in mix)
    # the labelled share sets the split of every batch; a share of 0 or 1 is refused (the mix needs both)
    three_quarters = make_sampler(s, {"labeled", "unlabeled"}, 8, 0.75, 3, 0, 1, 0, 4)
    assert three_quarters.counts == [6, 2] and all(s.labeled[b].sum() == 6 for b in three_quarters)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(UsageError, match="labelled share"):
            make_sampler(s, {"labeled", "unlabeled"}, 8, bad, 3, 0, 1, 0, 4)
    # one epoch of a pool visits each slice once
    sup = make_sampler(s, {"labeled"}, 4, 0.5, 0, 0, 1, 0, 100)
    n = int(s.labeled[s.split_mask("train")].sum())
    seen = np.concatenate([sup.global_batch(t) for t in range(n // 4)])
    assert len(np.unique(seen)) == len(seen)
