"""Reading and writing volumes with their exact geometry (size, spacing, origin, direction).

SimpleITK is the carrier everywhere: it keeps DICOM's LPS geometry and writes the NIfTI affine
correctly. `sitk.GetArrayFromImage` gives arrays in (z, y, x) order; a training "slice" is one z index.
Writes are atomic (temporary file in the same folder, then rename) and verified by reading back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medcl_cli.errors import InputNotFoundError, InvalidDataError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in VOLUME_SUFFIXES)


def strip_suffix(name: str) -> str:
    """`case_0000.nii.gz` -> `case_0000`."""
    low = name.lower()
    for s in VOLUME_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return name


def read_image(path: str | Path, finite: bool = False) -> sitk.Image:
    """A NIfTI/NRRD/MHA volume with its geometry; clear errors for missing, unreadable or truncated files
    (ITK zero-fills a cut `.nii.gz`), and with `finite` for NaN/inf voxels (ITK reads them as 0)."""
    from medcl_cli.data.nifti_checks import gzip_truncated, nonfinite_voxels

    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"image not found: {p}", "check the path")
    try:
        image = sitk.ReadImage(str(p))
        cut = gzip_truncated(p, image)
    except (RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        hint = "the file may be truncated or not a NIfTI/NRRD/MHA volume"
        if "orthonormal" in first:  # ITK refuses a sheared or scaled direction (sform/qform) outright
            first = "its direction (the rotation part of the sform/qform affine) is not orthonormal"
            hint = "fix the header's affine (a rotation, with the voxel size in the spacing) or re-export the image"
        raise InvalidDataError(f"cannot read {p}: {first}", hint) from None
    if cut:
        raise InvalidDataError(f"{p} is truncated (its compressed data ends early)", "copy or export the file again")
    if finite:
        bad = nonfinite_voxels(p, image)
        if bad:
            raise InvalidDataError(f"{p} has {bad} NaN/inf voxel(s)", "replace them (e.g. by 0) in the source file")
    return image


def write_image(image: sitk.Image, path: str | Path, verify: bool = True, compress: bool = True) -> Path:
    """Write atomically (temp file + rename) and, with `verify`, read back and compare geometry and voxels."""
    from medcl_cli.core.files import atomic_path

    p = Path(path)
    suffix = "".join(s for s in p.suffixes[-2:]) if p.name.endswith(".nii.gz") else p.suffix
    needed = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent()
    with atomic_path(p, suffix, needed, (RuntimeError, InvalidDataError)) as tmp:
        sitk.WriteImage(image, tmp, compress)
        if verify:
            back = sitk.ReadImage(tmp)
            if not same_grid(image, back, tol=1e-4):
                raise InvalidDataError(f"written image {p} does not read back on the same grid")
            if not np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(back)):
                raise InvalidDataError(f"written image {p} does not read back with the same voxels")
    return p


def geometry(image: sitk.Image) -> dict[str, list[float] | list[int]]:
    """Size, spacing, origin and direction as plain lists (for JSON and comparisons)."""
    return {
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    """True when both images have the same size and (within `tol`) spacing, origin and direction."""
    if a.GetSize() != b.GetSize():
        return False
    for x, y in (
        (a.GetSpacing(), b.GetSpacing()),
        (a.GetOrigin(), b.GetOrigin()),
        (a.GetDirection(), b.GetDirection()),
    ):
        if not np.allclose(x, y, atol=tol, rtol=0):
            return False
    return True


def grid_difference(a: sitk.Image, b: sitk.Image) -> str:
    """A short human description of how two grids differ ("" when they match)."""
    parts = []
    if a.GetSize() != b.GetSize():
        parts.append(f"size {a.GetSize()} vs {b.GetSize()}")
    for name, x, y in (
        ("spacing", a.GetSpacing(), b.GetSpacing()),
        ("origin", a.GetOrigin(), b.GetOrigin()),
        ("direction", a.GetDirection(), b.GetDirection()),
    ):
        if not np.allclose(x, y, atol=1e-3, rtol=0):
            parts.append(f"{name} {tuple(round(v, 4) for v in x)} vs {tuple(round(v, 4) for v in y)}")
    return "; ".join(parts)


def from_array(array: np.ndarray, like: sitk.Image | None = None) -> sitk.Image:
    """A SimpleITK image from a (z, y, x) array, copying the geometry of `like` when given."""
    img = sitk.GetImageFromArray(array)
    if like is not None:
        img.CopyInformation(like)
    return img
