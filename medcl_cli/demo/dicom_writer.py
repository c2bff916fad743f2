"""The built-in demo dataset as real DICOM: cine-MR-like short-axis series and mask series, via pydicom.

Pixel data comes from `data/synthetic.py` (three nested structures whose size follows slice position,
cardiac phase and the patient); this module only wraps it in DICOM the way a scanner export looks:
one folder per patient, files with opaque names, InstanceNumber running against the slice normal (so
ingest must sort by ImagePositionPatient), an oblique short-axis ImageOrientationPatient per patient,
PixelSpacing, SliceThickness, SliceLocation, TriggerTime (0 ms at end-diastole, ~300 ms at end-systole),
PatientAge, and fake but PHI-shaped PatientName / PatientID / PatientBirthDate / InstitutionName so the
PHI guard has something to keep out. Masks are DICOM series (SeriesDescription "Mask ...", values 0..3)
on the image grid, written for the first `labelled` patients; `medcl ingest --label-series Mask`
turns them into labels.

Each phase is its own study: ingest attaches a mask series to every image series of its study on the
same grid, so ED and ES (same grid) must not share a study or the ED mask would label the ES volume too.
UIDs are derived from the seed, so the same seed writes byte-identical headers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from medcl_cli.data.synthetic import LABELS, PHASES, synth_volume

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
UID_ROOT = "1.2.826.0.1.3680043.10.1024."  # a private-use prefix for generated demo UIDs
TRIGGER_MS = {"ED": 0.0, "ES": 310.0}
MASK_DESCRIPTION = "Mask"  # the --label-series pattern the demo passes to ingest


@dataclass
class DemoSeries:
    """One written series (for tests and the demo's summary)."""

    patient_id: str
    phase: str
    kind: str  # image | mask
    folder: Path
    n_slices: int
    image: np.ndarray  # (z, y, x) as stored, z ascending along the slice normal
    origin: tuple[float, float, float]  # ImagePositionPatient of the first slice along the normal
    spacing: tuple[float, float, float]  # (col spacing x, row spacing y, slice step z) in mm
    row_cosine: tuple[float, float, float]
    col_cosine: tuple[float, float, float]


@dataclass
class DemoDicom:
    root: Path
    series: list[DemoSeries] = field(default_factory=list)
    labelled_patients: list[str] = field(default_factory=list)
    unlabelled_patients: list[str] = field(default_factory=list)

    def patient_folder(self, patient_id: str) -> Path:
        return self.root / patient_id


def _uid(seed: int, *parts: object) -> UID:
    digest = hashlib.sha256(("|".join(map(str, (seed, *parts)))).encode()).hexdigest()
    return UID(UID_ROOT + str(int(digest[:24], 16))[:30])


def _orientation(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines of an oblique short-axis plane (orthonormal)."""
    a, b, c = np.deg2rad(rng.uniform(-35, -20)), np.deg2rad(rng.uniform(25, 45)), np.deg2rad(rng.uniform(-10, 10))
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    r = rz @ rx @ ry
    return r[:, 0], r[:, 1]


def _base(seed: int, pid: str, name: str, age: int, sex: str, phase: str, number: int, description: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = f"{2026 - age}0101"
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.InstitutionName = "Demo General Hospital"
    ds.ReferringPhysicianName = "Doe^Jane"
    ds.AccessionNumber = "ACC" + _uid(seed, pid, phase, "accession")[-6:]
    ds.StudyInstanceUID = _uid(seed, pid, phase, "study")
    ds.StudyID = f"{number}"
    ds.StudyDate = ds.SeriesDate = "20260315"
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.StudyDescription = "Cardiac cine MRI (medcl demo)"
    ds.FrameOfReferenceUID = _uid(seed, pid, phase, "for")
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.Modality = "MR"
    ds.Manufacturer = "medcl demo"
    ds.BodyPartExamined = "HEART"
    ds.MagneticFieldStrength = "1.5"
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SS"
    ds.RepetitionTime = "3.2"
    ds.EchoTime = "1.6"
    ds.FlipAngle = "60"
    ds.TriggerTime = f"{TRIGGER_MS[phase]:.1f}"
    ds.CardiacNumberOfImages = 25
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def write_demo_dicom(
    out: str | Path,
    n_patients: int = 8,
    labelled: int = 5,
    n_slices: int = 8,
    size: int = 64,
    seed: int = 0,
    first: int = 1,
) -> DemoDicom:
    """Write `n_patients` x (ED, ES) image series (+ mask series for the first `labelled` patients) under
    `out/<PatientID>/<series>/IM*.dcm`; PatientIDs count from DEMO<first>. Returns what was written, with
    the arrays, for checks."""
    root = Path(out)
    rng = np.random.default_rng([seed, first])
    demo = DemoDicom(root=root)
    pixel = (1.6 * 64 / size, 1.6 * 64 / size)  # a ~100 mm field of view whatever the matrix
    thickness = 8.0
    for p in range(first - 1, first - 1 + n_patients):
        pid = f"DEMO{p + 1:03d}"
        age, sex = int(rng.integers(25, 80)), ("F", "M")[p % 2]
        name = f"Demo^Patient{p + 1:02d}"
        scale = float(rng.uniform(0.85, 1.15))
        nz = int(n_slices + rng.integers(-1, 2))
        row, col = _orientation(rng)
        normal = np.cross(row, col)
        centre = np.array([rng.uniform(-20, 20), rng.uniform(-40, -10), rng.uniform(20, 60)])
        origin = centre - (size / 2) * (pixel[1] * row + pixel[0] * col) - (nz / 2) * thickness * normal
        gain = float(rng.uniform(0.8, 1.25))  # scanner/coil intensity differences between patients
        is_labelled = p - (first - 1) < labelled
        (demo.labelled_patients if is_labelled else demo.unlabelled_patients).append(pid)
        for f, phase in enumerate(PHASES):
            image, label = synth_volume(rng, nz, (size, size), phase, scale)
            stored = np.clip(np.rint(image * gain), 0, 4095).astype(np.uint16)
            kinds = [("image", stored, f"cine SA {phase}")]
            if is_labelled:
                kinds.append(("mask", label.astype(np.uint16), f"{MASK_DESCRIPTION} {phase} (1=RV 2=Myo 3=LV)"))
            for k, (kind, vol, description) in enumerate(kinds):
                number = 100 * (f + 1) + k + 1
                folder = root / pid / f"{number:04d}_{'mask' if kind == 'mask' else 'cine'}_{phase}"
                folder.mkdir(parents=True, exist_ok=True)
                series_uid = _uid(seed, pid, phase, kind, "series")
                for z in range(nz):
                    ds = _base(seed, pid, name, age, sex, phase, number, description)
                    ds.SeriesInstanceUID = series_uid
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, pid, phase, kind, z)
                    ds.ImageType = ["DERIVED", "SECONDARY"] if kind == "mask" else ["ORIGINAL", "PRIMARY", "M", "NONE"]
                    ds.InstanceNumber = nz - z  # scanners often count base -> apex; ingest must sort by position
                    ds.AcquisitionNumber = 1
                    ipp = origin + z * thickness * normal
                    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
                    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
                    ds.SliceLocation = f"{float(ipp @ normal):.4f}"
                    ds.SliceThickness = f"{thickness:.1f}"
                    ds.SpacingBetweenSlices = f"{thickness:.1f}"
                    ds.PixelSpacing = [f"{pixel[0]:.4f}", f"{pixel[1]:.4f}"]
                    ds.Rows, ds.Columns = size, size
                    if kind == "image":
                        ds.WindowCenter, ds.WindowWidth = "400", "800"
                    ds.PixelData = np.ascontiguousarray(vol[z]).tobytes()
                    name_hash = hashlib.sha1(f"{series_uid}{z}".encode()).hexdigest()[:8].upper()
                    ds.save_as(folder / f"IM{name_hash}.dcm", enforce_file_format=True)
                demo.series.append(
                    DemoSeries(
                        patient_id=pid, phase=phase, kind=kind, folder=folder, n_slices=nz, image=vol,
                        origin=cast("tuple[float, float, float]", tuple(float(v) for v in origin)),
                        spacing=(pixel[1], pixel[0], thickness),
                        row_cosine=cast("tuple[float, float, float]", tuple(float(v) for v in row)),
                        col_cosine=cast("tuple[float, float, float]", tuple(float(v) for v in col)),
                    )
                )
    return demo


def label_names_option() -> str:
    """The `--label-names` value for ingest (1=rv_cavity,...), from the synthetic label map."""
    return ",".join(f"{k}={v}" for k, v in LABELS.items() if k != "0")
