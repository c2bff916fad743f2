"""DICOM-SEG objects as label volumes on the grid of the image series they reference.

Each SEG frame is placed by its PlanePositionSequence position projected on the image's slice normal
(within a fraction of the slice spacing), after checking orientation and matrix; segment numbers become
label values and SegmentLabel the class names. Overlapping segments: the higher number wins.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from medcl_cli.data.dicom.frames import Frame
from medcl_cli.data.io import read_image


class SegMismatch(Exception):
    """The SEG does not lie on the referenced image's grid (the message says how)."""


def _pos(item: Any, shared: Any, keyword: str, seq: str) -> Any:
    for src in (item, shared):
        if src is not None and seq in src and src[seq].value and keyword in src[seq][0]:
            return src[seq][0][keyword].value
    return None


def seg_to_label(seg: Frame, image_path: str) -> tuple[sitk.Image, dict[int, str]]:
    """(uint8 label image on the image's grid, {segment number: label name})."""
    fp, _ = seg.source.open()
    with fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(fp)
        frames = np.asarray(ds.pixel_array)
    if frames.ndim == 2:
        frames = frames[None]
    image = read_image(image_path)
    size = image.GetSize()
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    row, col, normal = d[:, 0], d[:, 1], d[:, 2]
    spacing = image.GetSpacing()
    origin = np.asarray(image.GetOrigin())
    if (int(ds.Rows), int(ds.Columns)) != (size[1], size[0]):
        raise SegMismatch(f"SEG matrix {ds.Rows}x{ds.Columns} vs image {size[1]}x{size[0]}")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    names = {int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment_{int(s.SegmentNumber)}"))
             for s in ds.get("SegmentSequence", [])}
    fractional = str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL"
    threshold = 0.5 * float(ds.get("MaximumFractionalValue", 255) or 255) if fractional else 0
    label = np.zeros((size[2], size[1], size[0]), dtype=np.uint8)
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = _pos(item, shared, "ImagePositionPatient", "PlanePositionSequence")
        iop = _pos(item, shared, "ImageOrientationPatient", "PlaneOrientationSequence")
        seg_no = _pos(item, shared, "ReferencedSegmentNumber", "SegmentIdentificationSequence")
        if ipp is None or iop is None or seg_no is None:
            raise SegMismatch(f"SEG frame {i} lacks a position, orientation or segment number")
        iop_arr = np.asarray([float(v) for v in iop])
        if not (np.allclose(iop_arr[:3], row, atol=1e-3) and np.allclose(iop_arr[3:], col, atol=1e-3)):
            raise SegMismatch(f"SEG frame {i} orientation differs from the image")
        offset = np.asarray([float(v) for v in ipp]) - origin
        k = offset @ normal / spacing[2]
        inplane = np.array([offset @ row / spacing[0], offset @ col / spacing[1]])
        kz = int(round(k))
        if abs(k - kz) > 0.1 or not 0 <= kz < size[2] or np.abs(inplane).max() > 0.1:
            raise SegMismatch(f"SEG frame {i} at {tuple(round(float(v), 2) for v in ipp)} is not on an image slice")
        mask = frames[i] > threshold
        label[kz][mask] = np.maximum(label[kz][mask], int(seg_no))
    out = sitk.GetImageFromArray(label)
    out.CopyInformation(image)
    return out, names
