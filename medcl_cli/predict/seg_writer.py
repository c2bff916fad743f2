"""`predict --format dicom-seg`: the predicted mask as a DICOM Segmentation object (highdicom, optional).

The SEG references the source series frame by frame (classic files, or the frames of one enhanced
multi-frame object), so it is only written when the mask's grid is the series' own grid: each source
image's or frame's ImagePositionPatient must fall on a slice of the volume and its
ImageOrientationPatient must match the volume's direction (a series resampled on ingest, e.g. for gantry
tilt, is refused with a clear message). Patient and study attributes are copied from the source only with
`--allow-phi`; otherwise they are replaced by the series pseudonym (`series_<hash>`) and emptied (UIDs are
kept: the SEG must point at the images it segments).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medcl_cli import __version__
from medcl_cli.core.files import atomic_path
from medcl_cli.errors import InvalidDataError, UsageError
from medcl_cli.predict.inference import LoadedModel

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


def _read_header(source: Any) -> Any:
    """The header (no pixel data: highdicom needs the headers only) of a path or a `data.dicom.source.Source`, which
    may be a member of a zip archive."""
    import pydicom

    if isinstance(source, (str, Path)) or source.member is None:
        return pydicom.dcmread(str(getattr(source, "path", source)), stop_before_pixels=True)
    fp, _ = source.open()
    with fp:
        data = fp.read()
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)  # an open buffer: datasets get deep-copied


def _frame_item(ds: Any, keyword: str, sequence: str, index: int) -> Any:
    """`keyword` of frame `index` of an enhanced object: its per-frame functional group, else the shared one."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > i and sequence in items[i] and items[i][sequence].value:
            value = items[i][sequence][0].get(keyword)
            if value is not None:
                return value
    return None


def _slice_index(ipp: Any, iop: Any, rows: int, cols: int, image: sitk.Image) -> int:
    """The z index of a source image (or frame) in `image`, checking that it lies on the volume's grid."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if ipp is None or iop is None:
        raise InvalidDataError(
            "a DICOM source image has no position or orientation in the patient",
            "DICOM SEG needs positioned images; use the NIfTI output for this series",
        )
    expected = np.concatenate([direction[:, 0], direction[:, 1]])
    if not np.allclose(np.asarray([float(v) for v in iop]), expected, atol=1e-3):
        raise InvalidDataError(
            "the DICOM series' orientation differs from the predicted volume's (it was resampled on reading)",
            "DICOM SEG needs the series' own grid; use the NIfTI output for this series",
        )
    cont = image.TransformPhysicalPointToContinuousIndex([float(v) for v in ipp])
    k = int(round(cont[2]))
    if abs(cont[0]) > 1e-2 or abs(cont[1]) > 1e-2 or abs(cont[2] - k) > 1e-2 or not 0 <= k < image.GetSize()[2]:
        raise InvalidDataError(
            "a DICOM source image does not lie on a slice of the predicted volume (resampled or irregular series)",
            "DICOM SEG needs the series' own grid; use the NIfTI output for this series",
        )
    if (rows, cols) != (image.GetSize()[1], image.GetSize()[0]):
        raise InvalidDataError(
            f"DICOM image matrix {rows}x{cols} differs from the volume's {image.GetSize()[1]}x{image.GetSize()[0]}"
        )
    return k


def _unique(indices: list[int]) -> list[int]:
    if len(set(indices)) != len(indices):
        raise InvalidDataError(
            "two source images of the series share one slice position",
            "DICOM SEG cannot reference duplicate positions; use the NIfTI output for this series",
        )
    return indices


def _slice_indices(datasets: list[Any], image: sitk.Image) -> list[int]:
    """The z index of each single-frame source dataset in `image`, checking it lies on the grid."""
    return _unique([
        _slice_index(
            ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), int(ds.Rows), int(ds.Columns), image
        )
        for ds in datasets
    ])


def _frame_indices(ds: Any, frames: list[int], ipps: list[Any], image: sitk.Image) -> list[int]:
    """The z index of each listed frame (0-based; `ipps`: their positions) of an enhanced multi-frame dataset."""
    return _unique([
        _slice_index(
            ipp, _frame_item(ds, "ImageOrientationPatient", "PlaneOrientationSequence", i),
            int(ds.Rows), int(ds.Columns), image,
        )
        for i, ipp in zip(frames, ipps)
    ])


def _shared_orientation(ds: Any) -> Any:
    """`ds` with its frames' common orientation (and pixel measures) in the shared functional groups, where
    highdicom looks for them; vendors (Philips) often repeat them per frame. Only for referencing: the copy
    is not written anywhere."""
    import pydicom

    out = copy.deepcopy(ds)
    shared_seq = out.get("SharedFunctionalGroupsSequence")
    if not shared_seq:
        out.SharedFunctionalGroupsSequence = pydicom.Sequence([pydicom.Dataset()])
    shared = out.SharedFunctionalGroupsSequence[0]
    per = out.get("PerFrameFunctionalGroupsSequence") or []
    for sequence in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
        if sequence in shared or not per or sequence not in per[0]:
            continue
        first = per[0][sequence].value
        if all(sequence in item and item[sequence].value == first for item in per):
            shared[sequence] = copy.deepcopy(per[0][sequence])
            for item in per:
                del item[sequence]
    return out


def write_dicom_seg(
    label: sitk.Image,
    image: sitk.Image,
    files: list[Path],
    model: LoadedModel,
    path: Path,
    name: str,
    allow_phi: bool = False,
    frames: list[tuple[Any, int]] | None = None,
) -> Path:
    """Write the label image as a BINARY DICOM SEG (one segment per foreground class) at `path`, atomically.

    `frames`: the (Source, 0-based frame) pairs the volume was built from (sources may be zip
    members); without them, `files` are read. Classic series: one SEG frame per source file. An enhanced
    multi-frame source: one SEG frame per frame of this volume (every frame of the file when `frames` is
    absent), at that frame's position, referencing the source frame number(s) there."""
    hd = require_highdicom()
    from pydicom.sr.codedict import codes

    if label.GetDimension() != 3:
        raise InvalidDataError("DICOM SEG output needs a 3D series")
    sources: list[Any] = sorted({src for src, _ in frames}, key=lambda src: src.label()) if frames else list(files)
    datasets = [_read_header(src) for src in sources]
    volume = sitk.GetArrayFromImage(label)  # (z, rows, cols)
    classes = sorted(k for k in model.label_map if k > 0)
    numbers = np.zeros(max(int(volume.max()), max(classes, default=0)) + 1, dtype=np.uint8)
    for number, cid in enumerate(classes, start=1):  # segment numbers must run 1..N
        numbers[cid] = number
    ipps: list[Any] | None = None  # an enhanced source: the positions of this volume's frames
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        if len(datasets) != 1:
            raise InvalidDataError(
                f"the series' slices come from {len(datasets)} files, enhanced multi-frame objects among them; "
                "a DICOM SEG can reference one multi-frame image only",
                "use the NIfTI output for this series",
            )
        source = datasets[0]
        mine = sorted({i for _, i in frames or []}) or list(range(int(source.NumberOfFrames)))
        ipps = [_frame_item(source, "ImagePositionPatient", "PlanePositionSequence", i) for i in mine]
        ks = _frame_indices(source, mine, ipps, image)
        datasets = [_shared_orientation(source)]
    else:
        ks = _slice_indices(datasets, image)
    order = np.argsort(ks)
    seg_pixels = numbers[volume[[ks[i] for i in order]]]  # SEG frames in slice order: (frames, rows, cols)
    if ipps is None:
        datasets = [datasets[i] for i in order]
        positions = None
    else:
        # this volume's frames only, placed by their own positions: highdicom references the source frame(s)
        # at each position (a file holding several images per position, e.g. Philips magnitude + field map,
        # gets both referenced: they share the grid)
        positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in ipps[i]])
                     for i in order]
    if not allow_phi:
        datasets = [_pseudonymise(ds, name) for ds in datasets]
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
        plane_positions=positions,
    )
    with atomic_path(path, ".dcm") as tmp:
        seg.save_as(tmp)
    return path
