"""Test helpers (not tests): oblique synthetic volumes, a DICOM series writer, and a tiny trained U-Net run.

The DICOM writer derives ImagePositionPatient / ImageOrientationPatient / PixelSpacing from a SimpleITK
grid, so a series written here must read back on that grid. The tiny run is a real U-Net trained for a
hundred steps to segment a bright blob; predictions with it are checkable against the known blob.
"""

from __future__ import annotations

import datetime
import functools
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = {"0": "background", "1": "blob"}


def oblique_direction(ax: float = 0.35, ay: float = -0.2, az: float = 0.5) -> tuple[float, ...]:
    """A proper rotation (row-major 3x3) about three axes: an oblique acquisition."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ ry @ rx).ravel())


def blob_volume(
    size_xyz: tuple[int, int, int] = (44, 36, 7), seed: int = 0, scale: float = 300.0, offset: float = 50.0
) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) arrays (z, y, x): a bright ellipse per slice (moving with z) on a noisy background."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    cy = ny * (0.4 + 0.2 * rng.random()) + 2.0 * np.sin(z)
    cx = nx * (0.4 + 0.2 * rng.random()) + 2.0 * np.cos(z)
    ry, rx = ny * (0.18 + 0.1 * rng.random()), nx * (0.18 + 0.1 * rng.random())
    mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    img = mask * 1.0 + rng.normal(0, 0.15, mask.shape)
    return (offset + scale * img).astype(np.float32), mask.astype(np.uint8)


def oblique_image(array_zyx: np.ndarray, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """An image on an oblique, anisotropic grid with a non-zero origin."""
    img = sitk.Cast(sitk.GetImageFromArray(array_zyx), pixel_type)
    img.SetSpacing((0.7, 0.9, 3.5))
    img.SetOrigin((-112.25, 37.5, 210.125))
    img.SetDirection(oblique_direction())
    return img


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str | None = None, patient: str = "Doe^Jane") -> list[Path]:
    """One MR slice file per z index, with IPP/IOP/PixelSpacing consistent with `image`'s grid (int16 pixels)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    arr = np.rint(sitk.GetArrayFromImage(image)).astype(np.int16)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    today = datetime.date(2024, 1, 2).strftime("%Y%m%d")
    paths = []
    for k in range(arr.shape[0]):
        ipp = image.TransformIndexToPhysicalPoint((0, 0, k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"IM{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient, "PID-123", "19700101", "F"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC1", "1", ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "MR", "medcl-test", 3, k + 1
        ds.SeriesDescription = "oblique test"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{sz:.6f}"
        ds.SpacingBetweenSlices = f"{sz:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = arr[k].tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
        paths.append(Path(ds.filename))
    _ = pydicom  # imported for its side effects on the dataset classes
    return paths


def read_dicom_series(folder: Path) -> sitk.Image:
    """The series of `folder` read by SimpleITK (GDCM sorts by position along the normal)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@functools.lru_cache(maxsize=1)
def trained_blob_state(steps: int = 80) -> dict:
    """A checkpoint dict (the engine's keys) of a small U-Net trained to segment the bright blob."""
    import torch

    from medcl_cli.config import Config, ModelConfig, to_dict
    from medcl_cli.data.preprocess import image_slices, label_slices
    from medcl_cli.models.unet import build_unet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tests only: tiny ops on a shared 2-core machine are fastest single-threaded
    torch.manual_seed(0)
    size = 32
    xs, ys = [], []
    for seed in range(12):  # varied sizes, contrasts and aspect ratios; per-volume normalisation as in training
        rng = np.random.default_rng(100 + seed)
        shape = (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 6)
        img, lab = blob_volume(shape, seed=100 + seed, scale=float(rng.uniform(50, 1000)), offset=float(rng.uniform(-100, 500)))
        x, info = image_slices(img, size, "resize", "zscore")
        xs.append(x)
        ys.append(label_slices(lab, info))
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    cfg = Config(model=ModelConfig(channels=(8, 16), norm="batch"))
    net = build_unet(cfg.model, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (8,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x_all[idx]).logits, y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    torch.set_num_threads(threads)
    return {
        "format": 1,
        "method": "supervised",
        "stage": "finetune",
        "model": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "step": steps,
        "config": to_dict(cfg),
        "label_map": dict(LABELS),
        "preprocessing": {"image_size": size, "resize": "resize", "normalize": "zscore"},
        "num_classes": 2,
    }


def write_run(folder: Path, state: dict | None = None) -> Path:
    """A run folder holding `checkpoints/best.pt` and a run.json, as training writes them."""
    import json

    from medcl_cli.engine.checkpoint import save

    save(folder / "checkpoints" / "best.pt", state or trained_blob_state())
    (folder / "run.json").write_text(json.dumps({"run_id": folder.name, "command": "test"}))
    return folder


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def write_dataset(root: Path, splits: dict[str, str], unlabelled: tuple[str, ...] = (), labels: dict | None = None) -> Path:
    """A dataset folder in the contract of data/folder.py: oblique blob volumes, one case per split entry."""
    import json

    import pandas as pd

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rows, meta = [], []
    for i, (case_id, split) in enumerate(splits.items()):
        img, lab = blob_volume((40 + 3 * i, 36, 5), seed=50 + i, scale=200.0 + 50 * i)
        image = oblique_image(img)
        sitk.WriteImage(image, str(root / "images" / f"{case_id}.nii.gz"))
        label_rel = ""
        if case_id not in unlabelled:
            lab_img = sitk.GetImageFromArray(lab)
            lab_img.CopyInformation(image)
            sitk.WriteImage(lab_img, str(root / "labels" / f"{case_id}.nii.gz"))
            label_rel = f"labels/{case_id}.nii.gz"
        sx, sy, sz = image.GetSpacing()
        nx, ny, nz = image.GetSize()
        rows.append({"case_id": case_id, "image": f"images/{case_id}.nii.gz", "label": label_rel, "patient": case_id,
                     "split": split, "spacing_x": sx, "spacing_y": sy, "spacing_z": sz, "size_x": nx, "size_y": ny,
                     "size_z": nz, "source": "synthetic", "modality": "MR"})
        meta += [{"case_id": case_id, "slice": z, "slice_position": z / (nz - 1)} for z in range(nz)]
    pd.DataFrame(rows).to_csv(root / "cases.csv", index=False)
    pd.DataFrame(meta).to_csv(root / "meta.csv", index=False)
    info = {"format_version": 1, "name": root.name, "labels": labels or dict(LABELS), "modality": "MR",
            "medcl_version": "test", "counts": {"cases": len(rows)}}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `medcl ARGS` in-process through main() (error lines and exit codes included)."""
    from medcl_cli.cli.app import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    cap = capsys.readouterr()
    return code, cap.out, cap.err
