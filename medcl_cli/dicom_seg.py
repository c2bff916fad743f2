"""`predict --format dicom-seg`: the predicted mask as a DICOM Segmentation object (highdicom, optional).

The SEG references the source series frame by frame, so it is only written when the mask's grid is the
series' own grid: each source file's ImagePositionPatient must fall on a slice of the volume and its
ImageOrientationPatient must match the volume's direction (a series resampled on ingest, e.g. for gantry
tilt, is refused with a clear message). Patient and study attributes are copied from the source only with
`--allow-phi`; otherwise they are replaced by the case's pseudonymous name and emptied (UIDs are kept: the
SEG must point at the images it segments).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medcl_cli import __version__
from medcl_cli.errors import InvalidDataError, UsageError
from medcl_cli.inference import LoadedModel

PHI_KEYWORDS_EMPTY = (
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "InstitutionName",
    "InstitutionAddress",
    "OtherPatientIDs",
    "PatientAddress",
)


def require_highdicom() -> Any:
    """The highdicom module, or a clear error with the install command."""
    try:
        import highdicom
    except ImportError:
        raise UsageError(
            "--format dicom-seg needs the optional package highdicom, which is not installed",
            "install it with: pip install 'medcl[dicom-seg]'   (or: pip install highdicom)",
        ) from None
    return highdicom


def _pseudonymise(ds: Any, name: str) -> Any:
    out = copy.deepcopy(ds)
    out.PatientName = f"{name}^"  # a one-component person name (the trailing caret says so)
    out.PatientID = name
    for kw in PHI_KEYWORDS_EMPTY:
        if kw in out:
            if kw in ("StudyDate", "StudyTime", "PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
                setattr(out, kw, "")
            else:
                delattr(out, kw)
    from medcl_cli.data.meta import PHI_KEYWORDS

    for kw in PHI_KEYWORDS:  # the rest of the denylist (station, operators, physicians...): highdicom copies
        # some of them into the SEG (e.g. StationName into ContributingEquipmentSequence); UIDs stay as references
        if kw in out and kw not in ("PatientName", "PatientID") and kw not in PHI_KEYWORDS_EMPTY and not kw.endswith("UID"):
            delattr(out, kw)
    return out


def _slice_indices(datasets: list[Any], image: sitk.Image) -> list[int]:
    """The z index of each single-frame source dataset in `image`, checking it lies on the grid."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    indices = []
    for ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InvalidDataError(
                "--format dicom-seg supports single-frame source images only (found an enhanced multi-frame object)",
                "use the NIfTI output for multi-frame series",
            )
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if not np.allclose(iop, np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-3):
            raise InvalidDataError(
                "the DICOM series' orientation differs from the predicted volume's (it was resampled on reading)",
                "DICOM SEG needs the series' own grid; use the NIfTI output for this series",
            )
        cont = image.TransformPhysicalPointToContinuousIndex([float(v) for v in ds.ImagePositionPatient])
        k = int(round(cont[2]))
        if abs(cont[0]) > 1e-2 or abs(cont[1]) > 1e-2 or abs(cont[2] - k) > 1e-2 or not 0 <= k < image.GetSize()[2]:
            raise InvalidDataError(
                "a DICOM source image does not lie on a slice of the predicted volume (resampled or irregular series)",
                "DICOM SEG needs the series' own grid; use the NIfTI output for this series",
            )
        if (int(ds.Rows), int(ds.Columns)) != (image.GetSize()[1], image.GetSize()[0]):
            raise InvalidDataError(
                f"DICOM image matrix {ds.Rows}x{ds.Columns} differs from the volume's {image.GetSize()[1]}x{image.GetSize()[0]}"
            )
        indices.append(k)
    if len(set(indices)) != len(indices):
        raise InvalidDataError(
            "two source images of the series share one slice position",
            "DICOM SEG cannot reference duplicate positions; use the NIfTI output for this series",
        )
    return indices


def write_dicom_seg(
    label: sitk.Image,
    image: sitk.Image,
    files: list[Path],
    model: LoadedModel,
    path: Path,
    name: str,
    allow_phi: bool = False,
) -> Path:
    """Write the label image as a BINARY DICOM SEG (one segment per foreground class) at `path`, atomically."""
    hd = require_highdicom()
    import pydicom
    from pydicom.sr.codedict import codes

    if label.GetDimension() != 3:
        raise InvalidDataError("DICOM SEG output needs a 3D series")
    datasets = [pydicom.dcmread(str(f)) for f in files]
    ks = _slice_indices(datasets, image)
    order = np.argsort(ks)
    datasets = [datasets[i] for i in order]
    ks = [ks[i] for i in order]
    if not allow_phi:
        datasets = [_pseudonymise(ds, name) for ds in datasets]
    classes = sorted(k for k in model.label_map if k > 0)
    lab = sitk.GetArrayFromImage(label)[ks]  # frames in source order: (frames, rows, cols)
    seg_pixels = np.zeros(lab.shape, dtype=np.uint8)
    for number, cid in enumerate(classes, start=1):  # segment numbers must run 1..N
        seg_pixels[lab == cid] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medcl", version=__version__, family=codes.DCM.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=model.label_map[cid][:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, cid in enumerate(classes, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=seg_pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medcl",
        manufacturer_model_name=f"medcl {model.method}"[:64],
        software_versions=__version__,
        device_serial_number=model.run_id[:64] or "medcl",
        content_label="MEDCL",
        omit_empty_frames=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        seg.save_as(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
