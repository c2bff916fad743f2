"""Training slices cut from a dataset folder and cached once on disk as memory-mapped .npy arrays.

The cache key is the dataset fingerprint (manifest hash) + the data config that shapes slices (size,
resize, normalisation, partitions), so every later run (and every DDP rank) reuses it. It is built in a
temporary folder and renamed into place, so a crash never leaves a half cache that looks valid.
Location: `$MEDCL_CACHE_DIR/<key>` when set, else `DATASET/.medcl_cache/<key>`, falling back to
`~/.cache/medcl/<key>` when the dataset is read-only. Images and labels go through data/preprocess.py,
the same path evaluation and prediction use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch

from medcl_cli.core.files import make_tempdir, private_tempdir
from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.folder import (
    CASES_COLUMNS,
    META_BASE_COLUMNS,
    DatasetFolder,
    open_dataset,
)
from medcl_cli.data.io import read_image
from medcl_cli.data.channels import channel_arrays, read_channels
from medcl_cli.data.preprocess import channel_slices, image_slices, label_slices
from medcl_cli.errors import InvalidDataError

CACHE_VERSION = 1
_NON_META = set(CASES_COLUMNS) - {"patient"} | set(META_BASE_COLUMNS)


@dataclass
class SliceSet:
    """All slices of a dataset on the model grid, memory-mapped; `labeled` is set per run."""

    folder: DatasetFolder
    cache_dir: Path
    images: np.ndarray  # N x S x S float32 (one channel), N x C x S x S (C > 1 channels)
    labels: np.ndarray  # N x S x S int16, -1 for slices of cases without a label file
    case: np.ndarray  # N int64 index into case_ids
    slice: np.ndarray  # N int64 z index
    position: np.ndarray  # N float32 slice_position
    meta: np.ndarray  # N x M int64 codes, -1 = missing
    meta_names: list[str]
    meta_values: dict[str, list[str]]  # column -> the value of each code
    case_ids: list[str]
    case_patient: np.ndarray  # per case: index into patients
    patients: list[str]
    case_split: list[str]
    case_has_label: np.ndarray  # per case bool
    shapes_yx: list[tuple[int, int]]  # per case original slice shape
    labeled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # per slice, this run

    @property
    def num_classes(self) -> int:
        return self.folder.num_classes

    @property
    def channels(self) -> int:
        """Input channels per slice (model.in_channels)."""
        return 1 if self.images.ndim == 3 else int(self.images.shape[1])

    @property
    def channel_names(self) -> list[str]:
        return self.folder.channel_names

    def image_rows(self, rows: np.ndarray) -> torch.Tensor:
        """Slices `rows` as a B x C x S x S float32 tensor (a copy, in the order of `rows`)."""
        x = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        return x.unsqueeze(1) if x.ndim == 3 else x

    @property
    def meta_cardinality(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.meta_values.items()}

    def split_mask(self, split: str) -> np.ndarray:
        ok = np.array([s == split for s in self.case_split], dtype=bool)
        return ok[self.case]

    def case_slices(self, case_index: int) -> np.ndarray:
        return np.flatnonzero(self.case == case_index)


def cache_key(folder: DatasetFolder, data_cfg: Any) -> str:
    parts = [
        f"v{CACHE_VERSION}",
        folder.fingerprint(),
        str(data_cfg.image_size),
        str(data_cfg.resize),
        str(data_cfg.normalize),
        str(data_cfg.partitions),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def cache_location(folder: DatasetFolder, key: str) -> Path:
    """Where the cache of `key` lives (see the module docstring for the order)."""
    env = os.environ.get("MEDCL_CACHE_DIR")
    if env:
        return Path(env).expanduser() / f"{folder.root.name}-{key}"
    inside = folder.root / ".medcl_cache"
    if (inside / key).is_dir() or _writable(inside):
        return inside / key
    return Path.home() / ".cache" / "medcl" / f"{folder.root.name}-{key}"


def _codes(values: list[Any]) -> tuple[np.ndarray, list[str]]:
    """Integer codes over the sorted distinct non-missing values (-1 = missing)."""
    strs = [None if (v is None or (isinstance(v, float) and np.isnan(v)) or v == "") else str(v) for v in values]
    distinct = sorted({s for s in strs if s is not None}, key=lambda s: (len(s), s) if s.isdigit() else (0, s))
    lookup = {s: i for i, s in enumerate(distinct)}
    return np.array([lookup[s] if s is not None else -1 for s in strs], dtype=np.int64), distinct


def _build(folder: DatasetFolder, data_cfg: Any, target: Path, reporter: Reporter) -> None:
    cases = folder.cases.reset_index(drop=True)
    sizes = []
    for cid in cases["case_id"]:
        r = sitk.ImageFileReader()
        r.SetFileName(str(folder.image_path(cid)))
        try:
            r.ReadImageInformation()
        except RuntimeError:
            raise InvalidDataError(f"cannot read {folder.image_path(cid)}", "run medcl validate on the dataset") from None
        size = r.GetSize()
        sizes.append(int(size[2]) if len(size) > 2 else 1)
    n, s = int(sum(sizes)), int(data_cfg.image_size)
    nch = folder.num_channels
    shape = (n, s, s) if nch == 1 else (n, nch, s, s)  # one channel keeps the original cache layout
    tmp = make_tempdir(f".tmp-{target.name}-", target.parent)
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float32, shape=shape)
        labels = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.int16, shape=(n, s, s))
        case_idx, slice_idx, shapes = np.zeros(n, np.int64), np.zeros(n, np.int64), []
        k = 0
        reporter.start("caching slices", len(cases))
        for ci, cid in enumerate(cases["case_id"]):
            if nch == 1:
                arr = sitk.GetArrayFromImage(read_image(folder.image_path(cid), finite=True))
                if arr.ndim == 2:
                    arr = arr[None]
                x, info = image_slices(arr, s, data_cfg.resize, data_cfg.normalize)
                images[k : k + x.shape[0]] = x[:, 0].numpy()
            else:
                chans = channel_arrays(read_channels(folder.channel_paths(cid), finite=True))
                arr = chans[0]
                x, info = channel_slices(chans, s, data_cfg.resize, data_cfg.normalize)
                images[k : k + x.shape[0]] = x.numpy()
            z = x.shape[0]
            lp = folder.label_path(cid)
            if lp is not None:
                lab = sitk.GetArrayFromImage(read_image(lp))
                lab = lab[None] if lab.ndim == 2 else lab
                if lab.shape != arr.shape:
                    raise InvalidDataError(
                        f"label of case {cid} has shape {lab.shape}, its image {arr.shape}", "re-run medcl ingest"
                    )
                bad = np.setdiff1d(np.unique(lab), np.array(sorted(folder.labels)))
                if bad.size:
                    raise InvalidDataError(
                        f"label of case {cid} holds values {bad.tolist()} missing from dataset.json labels",
                        "fix the label map in dataset.json or the mask",
                    )
                labels[k : k + z] = label_slices(lab, info).numpy().astype(np.int16)
            else:
                labels[k : k + z] = -1
            case_idx[k : k + z], slice_idx[k : k + z] = ci, np.arange(z)
            shapes.append(list(info.shape_yx))
            k += z
            reporter.advance("caching slices")
        reporter.finish("caching slices")
        images.flush()
        labels.flush()
        del images, labels
        _write_index(folder, cases, case_idx, slice_idx, sizes, shapes, data_cfg, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "index.json").is_file():  # not a concurrent builder that won: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_index(
    folder: DatasetFolder, cases: Any, case_idx: np.ndarray, slice_idx: np.ndarray, sizes: list[int],
    shapes: list[list[int]], data_cfg: Any, tmp: Path,
) -> None:
    n = len(case_idx)
    position = np.where(
        np.array(sizes)[case_idx] > 1, slice_idx / np.maximum(np.array(sizes)[case_idx] - 1, 1), 0.0
    ).astype(np.float32)
    extra_case_cols = [c for c in cases.columns if c not in _NON_META]
    table = cases[["case_id"] + extra_case_cols].iloc[case_idx].reset_index(drop=True)
    table["slice"] = slice_idx
    meta = folder.meta
    meta_cols = [c for c in meta.columns if c not in META_BASE_COLUMNS]
    if meta_cols:
        m = meta[["case_id", "slice"] + meta_cols].drop_duplicates(["case_id", "slice"])
        table = table.drop(columns=[c for c in meta_cols if c in table.columns]).merge(
            m, on=["case_id", "slice"], how="left"
        )
    names = [c for c in dict.fromkeys(extra_case_cols + meta_cols)]
    codes, values = [], {}
    for c in names:
        code, distinct = _codes(table[c].tolist())
        codes.append(code)
        values[c] = distinct
    parts = max(int(data_cfg.partitions), 1)
    codes.append(np.minimum((position * parts).astype(np.int64), parts - 1))
    values["slice_part"] = [str(i) for i in range(parts)]
    names.append("slice_part")
    np.save(tmp / "meta.npy", np.stack(codes, axis=1) if codes else np.zeros((n, 0), np.int64))
    np.save(tmp / "case.npy", case_idx)
    np.save(tmp / "slice.npy", slice_idx)
    np.save(tmp / "position.npy", position)
    index = {
        "cache_version": CACHE_VERSION,
        "fingerprint": folder.fingerprint(),
        "case_ids": cases["case_id"].tolist(),
        "patients": cases["patient"].astype(str).tolist(),
        "splits": cases["split"].astype(str).tolist(),
        "has_label": [bool(folder.label_path(c)) for c in cases["case_id"]],
        "shapes_yx": shapes,
        "meta_names": names,
        "meta_values": values,
    }
    (tmp / "index.json").write_text(json.dumps(index), encoding="utf-8")


def open_slices(
    dataset: str | Path | DatasetFolder,
    data_cfg: Any,
    reporter: Reporter | None = None,
    builder: bool = True,
    barrier: Callable[[], None] | None = None,
) -> SliceSet:
    """The cached slices of a dataset (built first if needed). Under DDP only the `builder` rank builds
    and every rank meets at `barrier` before opening."""
    rep = reporter or NullReporter()
    folder = dataset if isinstance(dataset, DatasetFolder) else open_dataset(dataset)
    key = cache_key(folder, data_cfg)
    mode = str(data_cfg.cache)
    if mode == "none":  # every rank builds its own throw-away copy, reads it into memory and deletes it
        with private_tempdir("medcl-slices-") as work:
            _build(folder, data_cfg, work / key, rep)
            if barrier is not None:
                barrier()
            return _open(folder, work / key, ram=True)
    target = cache_location(folder, key)
    if builder and not (target / "index.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        rep.log(f"building the slice cache in {target} (once per dataset and data config)")
        _build(folder, data_cfg, target, rep)
    if barrier is not None:
        barrier()
    return _open(folder, target, ram=mode in ("ram", "none"))


def _open(folder: DatasetFolder, target: Path, ram: bool) -> SliceSet:
    try:
        index = json.loads((target / "index.json").read_text(encoding="utf-8"))
        mm: Literal["r"] | None = None if ram else "r"
        arrays = {n: np.load(target / f"{n}.npy", mmap_mode=mm) for n in ("images", "labels")}
        small = {n: np.load(target / f"{n}.npy") for n in ("case", "slice", "position", "meta")}
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise InvalidDataError(
            f"the slice cache {target} is damaged: {exc}", f"delete {target} and run again (it is rebuilt)"
        ) from None
    patients = sorted(set(index["patients"]))
    pidx = {p: i for i, p in enumerate(patients)}
    return SliceSet(
        folder=folder,
        cache_dir=target,
        images=arrays["images"],
        labels=arrays["labels"],
        case=small["case"],
        slice=small["slice"],
        position=small["position"],
        meta=small["meta"],
        meta_names=list(index["meta_names"]),
        meta_values={k: list(v) for k, v in index["meta_values"].items()},
        case_ids=list(index["case_ids"]),
        case_patient=np.array([pidx[p] for p in index["patients"]], dtype=np.int64),
        patients=patients,
        case_split=list(index["splits"]),
        case_has_label=np.array(index["has_label"], dtype=bool),
        shapes_yx=[(int(a), int(b)) for a, b in index["shapes_yx"]],
        labeled=np.zeros(len(small["case"]), dtype=bool),
    )
