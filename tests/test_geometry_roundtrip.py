"""The most important test: a mask predicted on an oblique, anisotropic, off-origin volume lands on the
input's exact grid and on the structure, whether the volume comes from NIfTI or from a DICOM series."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import volumes as V
from medcl_cli.data.io import read_image


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return V.write_run(tmp_path_factory.mktemp("geo") / "run")


def _grid(img: sitk.Image):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _assert_grid(a: sitk.Image, b: sitk.Image, tol: float) -> None:
    assert a.GetSize() == b.GetSize()
    for x, y in zip(_grid(a)[1:], _grid(b)[1:]):
        np.testing.assert_allclose(x, y, atol=tol, rtol=0)


def test_nifti_oblique_round_trip(run, tmp_path, capsys):
    img, blob = V.blob_volume((52, 41, 9), seed=11, scale=420.0, offset=-30.0)
    src = tmp_path / "in" / "oblique.nii.gz"
    src.parent.mkdir()
    sitk.WriteImage(V.oblique_image(img), str(src))
    code, _, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(tmp_path / "out"))
    assert code == 0, err
    inp, out = read_image(src), read_image(tmp_path / "out" / "oblique.nii.gz")
    # CopyInformation is bit-exact in memory (test_inference); writing NIfTI again rounds the direction
    # through float32 quaternions, so the file round trip is exact to float32 precision
    _assert_grid(out, inp, 1e-6)
    _assert_grid(out, V.oblique_image(img), 1e-5)  # and the grid we meant (NIfTI stores float32)
    assert np.abs(np.asarray(inp.GetDirection()) - np.eye(3).ravel()).max() > 0.1  # really oblique
    assert V.dice(sitk.GetArrayFromImage(out), blob) > 0.9  # the mask is on the structure


def test_dicom_oblique_round_trip(run, tmp_path, capsys):
    img, blob = V.blob_volume((48, 40, 8), seed=12, scale=600.0, offset=100.0)
    meant = V.oblique_image(img, sitk.sitkInt16)
    V.write_dicom_series(meant, tmp_path / "dicom" / "series1")
    code, out_text, err = V.run_cli(capsys, "predict", str(run), str(tmp_path / "dicom"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    preds = sorted((tmp_path / "out").glob("series_*.nii.gz"))
    assert len(preds) == 1 and "Doe" not in preds[0].name
    pred = read_image(preds[0])
    by_gdcm = V.read_dicom_series(tmp_path / "dicom" / "series1")  # an independent reader of the same files
    _assert_grid(pred, by_gdcm, 1e-4)
    _assert_grid(pred, meant, 1e-4)  # IPP/IOP are decimal strings: 1e-4 mm is their precision here
    assert V.dice(sitk.GetArrayFromImage(pred), blob) > 0.9
