"""Multi-sequence cases: one case = several co-registered volumes (channels), e.g. T1post, FLAIR and T2.

The layout is nnU-Net's: channel k of case `c` is the file `images/<c>_<kkkk>.nii.gz` (`_0000` first), all on
the grid of channel 0, and `dataset.json` maps channel indices to names (`"channel_names": {"0": "T1post",
...}`). cases.csv keeps `image` for channel 0 and adds `image_0001`, `image_0002`, ... for the others, so a
reader that only knows `image` still finds a valid volume. A single-channel dataset keeps
`images/<c>.nii.gz` and no `channel_names` (its one channel is named after the modality).

How a channel name finds its volume, everywhere (ingest of DICOM and NIfTI, predict): the comparison is
case-insensitive, and an exact match beats a prefix match, which beats a substring match
(`FLAIR` -> `FLAIR_reg`, `T2` -> `T2_reg`). Two candidates in the best tier are ambiguous and refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medcl_cli.data.io import grid_difference, read_image, same_grid
from medcl_cli.errors import InvalidDataError, UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_channels(text: str | None) -> list[str]:
    """`--channels T1post,FLAIR,T2` -> ["T1post", "FLAIR", "T2"]; [] when not given."""
    if text is None or not text.strip():
        return []
    names = [t.strip() for t in text.split(",")]
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise UsageError(
            f"--channels: '{bad[0]}' is not a channel name (letters, digits, _ . + - only; no empty items)",
            "e.g. --channels T1post,FLAIR,T2",
        )
    low = [n.lower() for n in names]
    dup = sorted({n for n in low if low.count(n) > 1})
    if dup:
        raise UsageError(f"--channels names '{dup[0]}' twice", "give each sequence once, in the order you want")
    if len(names) < 2:
        raise UsageError(
            f"--channels needs at least two names, found {names}",
            "leave --channels out for single-sequence data (every series becomes its own case)",
        )
    return names


def channel_file(case_id: str, k: int, ending: str = ".nii.gz") -> str:
    """`images/<case>_<kkkk>.nii.gz`: the nnU-Net file name of channel k (relative to the dataset)."""
    return f"images/{case_id}_{k:04d}{ending}"


def channel_column(k: int) -> str:
    """The cases.csv column of channel k: `image` for channel 0, `image_0001`, ... for the others."""
    return "image" if k == 0 else f"image_{k:04d}"


def image_columns(case_id: str, n_channels: int) -> dict[str, str]:
    """cases.csv image columns of a case (the single-channel layout when n_channels == 1)."""
    if n_channels <= 1:
        return {"image": f"images/{case_id}.nii.gz"}
    return {channel_column(k): channel_file(case_id, k) for k in range(n_channels)}


def _tier(channel: str, text: str) -> int:
    """3 exact, 2 prefix, 1 substring, 0 no match (case-insensitive)."""
    c, t = channel.lower(), text.lower().strip()
    if not c or not t:
        return 0
    if t == c:
        return 3
    if t.startswith(c):
        return 2
    return 1 if c in t else 0


def best_matches(channel: str, texts: Sequence[str]) -> list[int]:
    """Indices of `texts` in the best non-empty match tier of `channel` ([] when none matches)."""
    tiers = [_tier(channel, t) for t in texts]
    top = max(tiers, default=0)
    return [i for i, t in enumerate(tiers) if t == top] if top else []


def assign_channels(channels: Sequence[str], texts: Sequence[str]) -> tuple[list[int] | None, str]:
    """For each channel the index of its text (a series description, a file-name part), or (None, why)."""
    picks: list[int] = []
    for ch in channels:
        hits = best_matches(ch, texts)
        if not hits:
            seen = ", ".join(sorted(set(texts))) or "none"
            return None, f"no series/file matches channel '{ch}' (found: {seen})"
        if len(hits) > 1:
            names = ", ".join(texts[i] for i in hits)
            return None, f"channel '{ch}' matches {len(hits)} series/files equally well ({names})"
        picks.append(hits[0])
    if len(set(picks)) < len(picks):
        k = next(i for i, p in enumerate(picks) if picks.count(p) > 1)
        return None, f"'{texts[picks[k]]}' matches more than one channel; give more specific --channels names"
    return picks, ""


def resample_onto(image: sitk.Image, reference: sitk.Image, nearest: bool = False) -> sitk.Image:
    """`image` on `reference`'s grid (linear, or nearest for labels), by physical position; 0 outside."""
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    pixel = image.GetPixelID() if nearest else sitk.sitkFloat32
    return sitk.Resample(image, reference, sitk.Transform(), interp, 0.0, pixel)


def stack_channels(images: Sequence[sitk.Image]) -> tuple[sitk.Image, list[str]]:
    """One image of C components on channel 0's grid, plus a note per channel that had to be resampled.

    A single image comes back as it is (scalar); channels on another grid are resampled linearly."""
    if not images:
        raise InvalidDataError("no channel images to stack")
    ref = images[0]
    if len(images) == 1:
        return ref, []
    notes: list[str] = []
    parts = [sitk.Cast(ref, sitk.sitkFloat32)]
    for k, img in enumerate(images[1:], start=1):
        if img.GetDimension() != ref.GetDimension():
            raise InvalidDataError(
                f"channel {k} is {img.GetDimension()}D, channel 0 {ref.GetDimension()}D", "give volumes of one kind"
            )
        if same_grid(img, ref, tol=1e-3):
            moved = sitk.Cast(img, sitk.sitkFloat32)
            moved.CopyInformation(ref)
        else:
            notes.append(f"channel {k} resampled onto channel 0's grid ({grid_difference(img, ref)})")
            moved = resample_onto(img, ref)
        parts.append(moved)
    return sitk.Compose(parts), notes


def channel_arrays(image: sitk.Image) -> np.ndarray:
    """(C, z, y, x) float32 voxels of a scalar or multi-component 2D/3D image."""
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InvalidDataError(
            f"expected a 2D or 3D image, found {dim}D with size {image.GetSize()}",
            "split 4D series (e.g. cine phases) into 3D volumes first",
        )
    arr = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    arr = np.moveaxis(arr, -1, 0)  # components first
    if dim == 2:
        arr = arr[:, None]
    return np.ascontiguousarray(arr)


def read_channels(paths: Sequence[Path], finite: bool = False) -> sitk.Image:
    """The channel files of one case as one image (scalar for one file, C components otherwise)."""
    image, _ = stack_channels([read_image(p, finite=finite) for p in paths])
    return image


def channel_names_of(info: dict[str, object]) -> list[str]:
    """Channel names from a dataset.json (`channel_names` {"0": name, ...}); [modality] when absent."""
    raw = info.get("channel_names")
    if isinstance(raw, dict) and raw:
        try:
            return [str(raw[k]) for k in sorted(raw, key=lambda s: int(str(s)))]
        except ValueError:
            raise InvalidDataError(
                f"dataset.json channel_names must map 0, 1, ... to names, found {raw}", "re-run medcl ingest"
            ) from None
    modality = str(info.get("modality") or "image")
    return [modality if modality and modality != "unknown" else "image"]
