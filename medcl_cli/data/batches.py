"""Batches from a `SliceSet`: the labelled patient set, a step-indexed sampler, and the DataLoader.

A batch is one fancy-index lookup into the memory-mapped arrays (no per-sample Python work). The data
order is a pure function of (seed, step): the global batch of step t is drawn from per-pool random
permutations, so a resumed run continues with exactly the batches it would have seen, and DDP rank r
takes rows [r*B/W, (r+1)*B/W) of the same global batch (a single-process run sees the same samples).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import torch

from medcl_cli.data.dataset import SliceSet
from medcl_cli.errors import InputNotFoundError, UsageError, did_you_mean


def labeled_patients(slices: SliceSet, labeled: str | None, seed: int) -> list[str]:
    """The training patients whose masks this run may use, from `--labeled` (None/all | N | FILE)."""
    with_masks = sorted(
        {
            slices.patients[slices.case_patient[c]]
            for c, s in enumerate(slices.case_split)
            if s == "train" and slices.case_has_label[c]
        }
    )
    if labeled is None or str(labeled).strip().lower() in ("", "all"):
        return with_masks
    text = str(labeled).strip()
    if text.isdigit():
        n = int(text)
        if n < 1 or n > len(with_masks):
            raise UsageError(
                f"--labeled {n}: the training split has {len(with_masks)} patient(s) with masks",
                f"use a number from 1 to {len(with_masks)}, a file of patient ids, or all",
            )
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(with_masks, size=n, replace=False).tolist())
    path = Path(text)
    if not path.is_file():
        raise InputNotFoundError(
            f"--labeled {text}: not a number and no such file", "give N (patients drawn with --seed) or a file"
        )
    wanted = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    wanted = [w for w in wanted if w and not w.startswith("#")]
    unknown = [w for w in wanted if w not in with_masks]
    if unknown:
        hint = did_you_mean(unknown[0], with_masks)
        raise UsageError(
            f"{path} lists {len(unknown)} patient(s) that are not training patients with masks, "
            f"e.g. '{unknown[0]}'" + (f"; {hint}" if hint else ""),
            "one patient id per line, as in the `patient` column of cases.csv (train split)",
        )
    if not wanted:
        raise UsageError(f"{path} lists no patients", "one patient id per line")
    return sorted(set(wanted))


def mark_labeled(slices: SliceSet, patients: list[str]) -> None:
    """Set `slices.labeled`: the slice's case has a mask and its patient is in `patients`."""
    chosen = np.isin(np.array(slices.patients), np.array(patients, dtype=object))
    per_case = chosen[slices.case_patient] & slices.case_has_label
    slices.labeled = per_case[slices.case]


class StepSampler:
    """Yields, for steps start..end-1, this rank's index array of each global batch."""

    def __init__(
        self,
        pools: list[np.ndarray],
        counts: list[int],
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        end: int = 0,
    ) -> None:
        for p, c in zip(pools, counts):
            if c > 0 and len(p) == 0:
                raise UsageError("a batch needs slices from an empty pool", "check --labeled and the dataset splits")
        self.pools, self.counts = pools, counts
        self.seed, self.rank, self.world = seed, rank, world
        self.start, self.end = start, end
        self.batch = int(sum(counts))
        if self.batch % world:
            raise UsageError(f"--batch-size {self.batch} is not divisible by the {world} ranks")
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, pool: int, epoch: int) -> np.ndarray:
        key = (pool, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, pool, epoch])
            self._perm_cache[key] = self.pools[pool][rng.permutation(len(self.pools[pool]))]
        return self._perm_cache[key]

    def global_batch(self, step: int) -> np.ndarray:
        out = []
        for i, (pool, c) in enumerate(zip(self.pools, self.counts)):
            if c == 0:
                continue
            pos = step * c + np.arange(c)
            epoch, within = pos // len(pool), pos % len(pool)
            for e in np.unique(epoch):
                out.append(self._perm(i, int(e))[within[epoch == e]])
        return np.concatenate(out)

    def local_rows(self) -> np.ndarray:
        """Positions of this rank's samples in the global batch: strided, so every rank gets its share of
        each pool (labelled and unlabelled) instead of one rank taking all the labelled slices."""
        return np.arange(self.rank, self.batch, self.world)

    def local_batch(self, step: int) -> np.ndarray:
        return self.global_batch(step)[self.local_rows()]

    def __len__(self) -> int:
        return max(self.end - self.start, 0)

    def __iter__(self) -> Iterator[np.ndarray]:
        for step in range(self.start, self.end):
            yield self.local_batch(step)


def make_sampler(
    slices: SliceSet, needs: set[str], batch: int, labeled_fraction: float, seed: int, rank: int, world: int,
    start: int, end: int,
) -> StepSampler:
    """Pools by what the method needs: labelled only, all training slices, or a labelled/unlabelled mix."""
    train = np.flatnonzero(slices.split_mask("train"))
    lab = train[slices.labeled[train]]
    unl = train[~slices.labeled[train]]
    if "labeled" in needs and "unlabeled" in needs:
        if not 0.0 < labeled_fraction < 1.0:
            raise UsageError(
                f"the labelled share of a batch must be between 0 and 1 (exclusive), found {labeled_fraction}",
                "set train.labeled_fraction_per_batch (e.g. 0.5: half labelled, half unlabelled)",
            )
        n_lab = int(round(batch * labeled_fraction))
        n_lab = min(max(n_lab, 1), batch - 1) if batch > 1 else batch
        if len(unl) == 0:  # every patient labelled: the unlabelled stream draws from all training slices
            unl = train
        pools, counts = [lab, unl], [n_lab, batch - n_lab]
    elif "labeled" in needs:
        pools, counts = [lab], [batch]
    else:
        pools, counts = [train], [batch]
    if len(pools[0]) == 0:
        raise UsageError(
            "no labelled training slices for a method that needs labels",
            "check --labeled and that the training split has masks (cases.csv `label` column)",
        )
    return StepSampler(pools, counts, seed, rank, world, start, end)


class BatchSource(torch.utils.data.Dataset):
    """`source[index_array]` is one whole batch (keys in docs/architecture.md)."""

    def __init__(self, slices: SliceSet) -> None:
        self.s = slices

    def __getstate__(self) -> dict[str, object]:
        """Workers started by spawn (macOS) reopen the memory maps instead of receiving a pickled copy."""
        s = self.s
        if isinstance(s.images, np.memmap):
            absent = cast(np.ndarray, None)  # left out of the pickle: __setstate__ reopens both maps
            return {"s": dataclasses.replace(s, images=absent, labels=absent), "reopen": True}
        return {"s": s, "reopen": False}

    def __setstate__(self, state: dict[str, object]) -> None:
        s = state["s"]
        assert isinstance(s, SliceSet)
        if state["reopen"]:
            s = dataclasses.replace(
                s,
                images=np.load(s.cache_dir / "images.npy", mmap_mode="r"),
                labels=np.load(s.cache_dir / "labels.npy", mmap_mode="r"),
            )
        self.s = s

    def __len__(self) -> int:
        return len(self.s.case)

    def __getitem__(self, idx: np.ndarray) -> dict[str, object]:
        s = self.s
        order = np.argsort(idx, kind="stable")  # sorted reads are sequential on the memmap
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        sidx = idx[order]
        image = torch.from_numpy(np.ascontiguousarray(s.images[sidx][inv]))
        if image.ndim == 3:  # one-channel cache: N x S x S
            image = image.unsqueeze(1)
        label = torch.from_numpy(np.ascontiguousarray(s.labels[sidx][inv]).astype(np.int64))
        labeled = torch.from_numpy(s.labeled[idx].copy())
        label[~labeled] = -1
        case = s.case[idx]
        return {
            "image": image,
            "label": label,
            "labeled": labeled,
            "case": torch.from_numpy(case.copy()),
            "patient": torch.from_numpy(s.case_patient[case].copy()),
            "slice": torch.from_numpy(s.slice[idx].copy()),
            "slice_position": torch.from_numpy(s.position[idx].copy()),
            "meta": {n: torch.from_numpy(s.meta[idx, j].copy()) for j, n in enumerate(s.meta_names)},
        }


def auto_workers(setting: str | int, device_type: str) -> int:
    """Data-loader workers: 0 on Windows or small CPU-only machines (batches are cheap lookups)."""
    env = os.environ.get("MEDCL_NUM_WORKERS")
    if str(setting) != "auto":
        return max(int(setting), 0)
    if env is not None and env.isdigit():
        return int(env)
    cores = os.cpu_count() or 1
    if sys.platform.startswith("win") or (device_type == "cpu" and cores <= 4):
        return 0
    return min(4, max(cores // 4, 1))


def make_loader(slices: SliceSet, sampler: StepSampler, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        BatchSource(slices),
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
