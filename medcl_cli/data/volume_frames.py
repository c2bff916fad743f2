"""4D volumes and NaN/inf voxels in NIfTI/NRRD/MHA inputs: `medcl ingest --frames` and the voxel repair.

A 4D file (cine MR, DWI, ACDC's `*_4d.nii.gz`) is readable; it is just not one 3D case. Without `--frames`
it is refused with its shape and the option to use (`failed:4d`); `--frames split` makes one case per frame
(`<case>_f00`, `<case>_f01`, ...: one patient, so a split never separates the frames of one file), and
`--frames N` keeps frame N (0-based, the one `split` would call `_fNN`). Each frame keeps the 3D part of the
input's geometry (spacing, origin, the 3x3 block of the direction); the time axis is dropped. A 4D label
next to a 4D image is split the same way; a 3D label beside a split 4D image is refused (it labels one frame:
pick that one with `--frames N`).

NaN and inf voxels are replaced by the minimum finite value of the case's volume, and the report row says how
many and by what. ITK's NIfTI reader turns them into 0 before medcl sees them, so where they were is read
from the raw file (nibabel) for NIfTI, from the ITK array for NRRD/MHA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medcl_cli.errors import UsageError

Frames = str | int | None  # None: refuse 4D; "split": one case per frame; N: frame N only
SPLIT = "split"
OPTION_HINT = "--frames split (one case per frame) or --frames N (frame N only, 0-based)"


class FramesError(ValueError):
    """A 4D input that cannot become cases as asked (no --frames, N out of range, label frames differ)."""

    def __init__(self, message: str, status: str = "failed:4d") -> None:
        super().__init__(message)
        self.status = status


def parse_frames(text: str | None) -> Frames:
    """`--frames` value: None, "split" or a frame index >= 0; a UsageError for anything else."""
    if text is None or text.strip() == "":
        return None
    value = text.strip().lower()
    if value == SPLIT:
        return SPLIT
    if value.isdigit():
        return int(value)
    raise UsageError(f"--frames '{text}' is neither 'split' nor a frame number",
                     "use --frames split (one case per frame) or --frames 0, --frames 1, ... (one frame)")


def shape_text(image: sitk.Image) -> str:
    """`16 x 16 x 4 x 3` (x, y, z, t as in the file header)."""
    return " x ".join(str(s) for s in image.GetSize())


def frame_suffix(index: int, count: int) -> str:
    """`_f00`, `_f01`, ... (more digits past 100 frames, so ids sort in frame order)."""
    return f"_f{index:0{max(2, len(str(count - 1)))}d}"


def frame_ids(path: Path, case_id: str) -> list[str]:
    """The case ids `--frames split` gives `path` (from its header alone): one per frame of a 4D volume."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:  # unreadable: the conversion says why
        return [case_id]
    size = reader.GetSize()
    if len(size) != 4 or size[3] < 2:
        return [case_id]
    return [case_id + frame_suffix(k, size[3]) for k in range(size[3])]


def n_frames(image: sitk.Image) -> int:
    """Time points of a 4D image (1 for 2D/3D)."""
    return image.GetSize()[3] if image.GetDimension() == 4 else 1


def frame(image: sitk.Image, index: int) -> sitk.Image:
    """Frame `index` of a 4D image as a 3D image with the 3D part of its geometry."""
    out = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image)[index])
    out.SetSpacing(image.GetSpacing()[:3])
    out.SetOrigin(image.GetOrigin()[:3])
    out.SetDirection(tuple(float(v) for v in np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3].ravel()))
    return out


def _as_3d(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 2:
        return sitk.JoinSeries([image])
    if image.GetDimension() == 4:
        return frame(image, 0)
    return image


def pick_frames(image: sitk.Image, choice: Frames, what: str = "volume") -> list[tuple[int | None, sitk.Image]]:
    """The 3D volumes `choice` makes of `image`: [(None, image)] for 2D/3D (and 4D with one frame), one
    (k, frame k) per frame for "split", [(N, frame N)] for N; FramesError for a 4D image without a choice."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(f"{image.GetNumberOfComponentsPerPixel()} components per voxel (vector/RGB image); "
                         "write one scalar channel per file")
    if image.GetDimension() > 4:
        raise FramesError(f"{image.GetDimension()}D {what} ({shape_text(image)}): only 3D and 4D volumes are read")
    count = n_frames(image)
    if count == 1:
        return [(None, _as_3d(image))]
    if choice is None:
        raise FramesError(f"4D {what} ({shape_text(image)}: {count} frames of "
                          f"{' x '.join(str(s) for s in image.GetSize()[:3])}); ingest it with {OPTION_HINT}")
    if choice == SPLIT:
        return [(k, frame(image, k)) for k in range(count)]
    assert isinstance(choice, int)
    if choice >= count:
        raise FramesError(f"frame {choice} asked for (--frames {choice}), but the 4D {what} ({shape_text(image)}) "
                          f"has frames 0..{count - 1}")
    return [(choice, frame(image, choice))]


def label_frame(label: sitk.Image, name: str, index: int | None, image_frames: int, choice: Frames) -> sitk.Image:
    """The label of image frame `index` (None: the image was 3D): frame `index` of a 4D label with as many
    frames as the image, a 3D label as it is unless the image was split; FramesError otherwise."""
    count = n_frames(label)
    if count == 1:
        if index is not None and choice == SPLIT:
            raise FramesError(f"label {name} is 3D but its image is split into {image_frames} frames; it labels "
                              "one frame: keep that one with --frames N", "failed:label")
        return _as_3d(label)
    if index is None or count != image_frames:
        image = f"{image_frames} frames" if index is not None else "one (3D)"
        raise FramesError(f"label {name} has {count} frames ({shape_text(label)}), its image {image}: give one "
                          "label frame per image frame, or a 3D label with --frames N", "failed:label")
    return frame(label, index)


def nonfinite_masks(path: Path, image: sitk.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """(NaN, inf) masks in ITK array order ((t,) z, y, x), None when every voxel is finite or the file is
    not floating point. Read from the raw NIfTI: ITK has already turned those voxels into 0."""
    if sitk.GetArrayViewFromImage(image).dtype.kind != "f":  # integer voxels cannot be NaN/inf: no raw read
        return None
    arr: np.ndarray | None = None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            # nibabel annotates load() as FileBasedImage, which lacks .dataobj (every image it returns has it)
            raw = np.asarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - ITK read it; nibabel not: count on ITK's array
            raw = None
        want = sitk.GetArrayViewFromImage(image).shape
        if raw is not None and raw.size == int(np.prod(want)):
            arr = raw.T.reshape(want)
    if arr is None:
        arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind != "f" or bool(np.all(np.isfinite(arr))):
        return None
    return np.isnan(arr), np.isinf(arr)


def masks_of(masks: tuple[np.ndarray, np.ndarray] | None, index: int | None, shape: tuple[int, ...]
             ) -> tuple[np.ndarray, np.ndarray] | None:
    """The masks of frame `index` (None: the whole volume), shaped like the frame's array."""
    if masks is None:
        return None
    nan, inf = (m[index] if index is not None else m for m in masks)
    return nan.reshape(shape), inf.reshape(shape)


def repair_nonfinite(image: sitk.Image, masks: tuple[np.ndarray, np.ndarray] | None
                     ) -> tuple[sitk.Image, dict[str, int | float] | None]:
    """`image` with its NaN/inf voxels set to its minimum finite value, and `{"nan": N, "inf": M, "value": v}`
    (None when there were none); FramesError (failed:nonfinite) when no voxel is finite."""
    if masks is None:
        return image, None
    nan, inf = masks
    bad = nan | inf
    n_nan, n_inf = int(nan.sum()), int(inf.sum())
    if not n_nan and not n_inf:
        return image, None
    arr = sitk.GetArrayFromImage(image)
    if bool(bad.all()):
        raise FramesError(f"every voxel is NaN or inf ({n_nan} NaN, {n_inf} inf): no value to keep",
                          "failed:nonfinite")
    low = arr[~bad].min()
    arr[bad] = low
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out, {"nan": n_nan, "inf": n_inf, "value": float(low)}


def nonfinite_note(counts: dict[str, int | float] | None) -> str:
    """`replaced 3 NaN and 1 inf voxels by the minimum -2` ("" for None)."""
    if not counts:
        return ""
    n_nan, n_inf = int(counts["nan"]), int(counts["inf"])
    text = " and ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "inf")) if n)
    return f"replaced {text} voxel{'s' if n_nan + n_inf > 1 else ''} by the minimum {float(counts['value']):g}"


def replace_nonfinite(image: sitk.Image, masks: tuple[np.ndarray, np.ndarray] | None) -> tuple[sitk.Image, str]:
    """`image` with its NaN/inf voxels set to its minimum finite value, and the note for the report ("" when
    there were none); FramesError (failed:nonfinite) when no voxel is finite."""
    out, counts = repair_nonfinite(image, masks)
    return out, nonfinite_note(counts)


def read_repaired(path: Path) -> tuple[sitk.Image, dict[str, int | float] | None]:
    """A NIfTI/NRRD/MHA volume (data/io.py read_image) with NaN/inf voxels replaced as ingest does (the raw
    values read with nibabel for NIfTI) and what was replaced (None: nothing); FramesError when no voxel is
    finite. What `medcl predict` reads its volume inputs with."""
    from medcl_cli.data.io import read_image

    image = read_image(path)
    return repair_nonfinite(image, nonfinite_masks(path, image))
