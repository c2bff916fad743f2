"""Synthetic DICOM written with pydicom for ingest tests: classic series, enhanced multi-frame, SR, and
files with chosen defects (gaps, duplicates, tilt, compressed syntax, PHI markers).

Pixel values are deterministic (`volume(n, rows, cols)`) so tests can compare the NIfTI against the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
            "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
            "StationName", "OtherPatientIDs", "StudyID")


def volume(n: int, rows: int = 16, cols: int = 16, seed: int = 0) -> np.ndarray:
    """(n, rows, cols) int16 test pattern: slice k holds values around 100*k so order errors show."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 50, size=(n, rows, cols)) + 100 * np.arange(n)[:, None, None]).astype(np.int16)


def _base(sop_class: str, study: str, series: str, phi: dict[str, str] | None, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0001"
    ds.PatientAge = "045Y"
    ds.PatientSex = "F"
    for key, value in (phi or {}).items():
        setattr(ds, key, value)
    return ds


def _pixels(ds: Dataset, arr: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = arr.astype("<i2").tobytes()


def write_series(
    folder: Path,
    data: np.ndarray,
    positions: Sequence[float] | None = None,
    *,
    step: float = 2.0,
    spacing: tuple[float, float] = (0.8, 0.7),
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    inplane_shift: Sequence[tuple[float, float]] | None = None,
    study: str | None = None,
    series: str | None = None,
    description: str = "T1",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    echo: int | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    phi: dict[str, str] | None = None,
    instance_order: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    modality: str = "MR",
    sop_class: str = MR,
) -> list[Path]:
    """One classic single-frame file per slice of `data` (z, y, x); slice k at `positions[k]` mm along the
    normal (default k * step), optionally shifted in-plane by `inplane_shift[k]` (mm along row, col)."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    series = series or generate_uid()
    n = data.shape[0]
    pos = list(positions) if positions is not None else [k * step for k in range(n)]
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    order = list(instance_order) if instance_order is not None else list(range(n))
    paths = []
    for k in range(n):
        ds = _base(sop_class, study, series, phi, modality)
        ds.SeriesDescription = description
        ds.SeriesNumber = 3
        ds.ImageType = list(image_type)
        ds.InstanceNumber = order[k] + 1
        shift = inplane_shift[k] if inplane_shift is not None else (0.0, 0.0)
        ipp = np.asarray(origin, float) + pos[k] * normal + shift[0] * row + shift[1] * col
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = step
        ds.SliceLocation = f"{float(ipp @ normal):.4f}"
        if echo is not None:
            ds.EchoNumbers = echo
        if slope != 1.0 or intercept != 0.0 or modality == "CT":
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept
        _pixels(ds, data[k])
        name = names[k] if names is not None else f"IM{(k * 7919) % 100003:06d}"
        p = folder / name
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_enhanced(path: Path, data: np.ndarray, positions: Sequence[float], *, step: float = 3.0,
                   spacing: tuple[float, float] = (1.0, 1.0), phi: dict[str, str] | None = None) -> Path:
    """An Enhanced MR object: frame i at z = positions[i], positions only in per-frame functional groups."""
    ds = _base(ENHANCED_MR, generate_uid(), generate_uid(), phi, "MR")
    ds.SeriesDescription = "enhanced"
    ds.SeriesNumber = 7
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = data.shape[0]
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    measures = Dataset()
    measures.PixelSpacing = list(spacing)
    measures.SliceThickness = step
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for i, z in enumerate(positions):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [-5.0, -6.0, float(z)]
        item.PlanePositionSequence = DicomSequence([pp])
        fc = Dataset()
        fc.InStackPositionNumber = i + 1
        item.FrameContentSequence = DicomSequence([fc])
        tr = Dataset()
        tr.RescaleSlope = 1
        tr.RescaleIntercept = 0
        item.PixelValueTransformationSequence = DicomSequence([tr])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _pixels(ds, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_sr(path: Path, phi: dict[str, str] | None = None) -> Path:
    """A Basic Text SR (non-image object that ingest lists and skips)."""
    ds = _base(BASIC_SR, generate_uid(), generate_uid(), phi, "SR")
    ds.SeriesDescription = "report"
    ds.ValueType = "CONTAINER"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_jpeg_series(folder: Path, n: int = 3) -> list[Path]:
    """n MR slices declared JPEG Baseline with bogus encapsulated data (undecodable without a codec)."""
    from pydicom.encaps import encapsulate

    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = _base(MR, study, series, None, "MR")
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.SeriesDescription = "jpeg"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelSpacing = [1, 1]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.0 * k]
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(60) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        p = folder / f"jpeg{k}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
