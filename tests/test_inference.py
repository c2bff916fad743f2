"""Inference: exact grid of the output, the shared preprocessing path, batching, loading runs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

import volumes as V
from medcl_cli.predict import inference as I
from medcl_cli.errors import InputNotFoundError, InvalidDataError


class Threshold(nn.Module):
    """Class 1 where the normalised intensity is positive: a 'model' whose answer is known exactly."""

    head = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        from medcl_cli.models.unet import NetOut

        return NetOut(torch.cat([torch.zeros_like(x), 50.0 * x], dim=1), [], [])


def _model(prep, net=None):
    return I.LoadedModel(
        net=net or Threshold(), label_map={0: "background", 1: "blob"}, preprocessing=prep, method="test",
        stage="finetune", run_id="r", checkpoint=__import__("pathlib").Path("x.pt"), device=torch.device("cpu"),
    )


def _two_level(shape_zyx, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape_zyx, np.uint8)
    for z in range(shape_zyx[0]):
        y0, x0 = rng.integers(2, shape_zyx[1] // 2), rng.integers(2, shape_zyx[2] // 2)
        mask[z, y0 : y0 + shape_zyx[1] // 3, x0 : x0 + shape_zyx[2] // 4] = 1
    return (mask * 900.0 + 100.0).astype(np.float32), mask


def _same_exact(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def test_identity_size_gives_the_exact_mask_on_the_exact_grid():
    img_arr, mask = _two_level((5, 32, 32))
    image = V.oblique_image(img_arr)
    out = I.predict_image(_model({"image_size": 32, "resize": "resize", "normalize": "zscore"}), image)
    _same_exact(out, image)
    assert out.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), mask)


def test_pad_crop_restores_a_non_square_slice_exactly():
    img_arr, mask = _two_level((4, 27, 45), seed=1)
    image = V.oblique_image(img_arr)
    out = I.predict_image(_model({"image_size": 36, "resize": "pad_crop", "normalize": "minmax"}), image)
    _same_exact(out, image)
    pred = sitk.GetArrayFromImage(out)
    # the 45-wide slice is cropped to 36 columns: outside them the model saw nothing (background)
    np.testing.assert_array_equal(pred[:, :, 4:40], mask[:, :, 4:40])
    assert not pred[:, :, :4].any() and not pred[:, :, 40:].any()


def test_resize_path_and_batch_size_do_not_change_the_answer():
    img_arr, mask = _two_level((7, 50, 38), seed=2)
    image = V.oblique_image(img_arr)
    m = _model({"image_size": 32, "resize": "resize", "normalize": "zscore"})
    a = sitk.GetArrayFromImage(I.predict_image(m, image, batch_size=1))
    b = sitk.GetArrayFromImage(I.predict_image(m, image, batch_size=5))
    np.testing.assert_array_equal(a, b)
    assert V.dice(a, mask) > 0.85  # bilinear down- and up-sampling blurs the 9-voxel-wide edges


def test_2d_image_and_bad_inputs():
    img_arr, mask = _two_level((1, 32, 32), seed=3)
    img2d = sitk.GetImageFromArray(img_arr[0])
    img2d.SetSpacing((0.5, 0.7))
    img2d.SetOrigin((3.0, -4.0))
    m = _model({"image_size": 32})
    out = I.predict_image(m, img2d)
    assert out.GetDimension() == 2
    _same_exact(out, img2d)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), mask[0])
    rgb = sitk.Image([8, 8, 2], sitk.sitkVectorFloat32, 3)
    with pytest.raises(InvalidDataError):
        I.predict_image(m, rgb)


def test_load_model_from_a_run_and_clear_errors(tmp_path):
    run = V.write_run(tmp_path / "run1")
    model = I.load_model(run)
    assert model.label_map == {0: "background", 1: "blob"}
    assert model.preprocessing["image_size"] == 32 and model.run_id == "run1" and model.method == "supervised"
    assert model.checkpoint.name == "best.pt"
    with pytest.raises(InputNotFoundError):
        I.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError):
        I.load_model(tmp_path / "empty")
    bad = dict(V.trained_blob_state(), label_map={"0": "background", "1": "a", "2": "b"}, num_classes=3)
    with pytest.raises(InvalidDataError):
        I.load_model(V.write_run(tmp_path / "run2", bad))


def test_sha256_of_a_file_and_of_a_series(tmp_path):
    import hashlib

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"abc")
    b.write_bytes(b"def")
    assert I.sha256_files([a]) == hashlib.sha256(b"abc").hexdigest()
    assert I.sha256_files([b, a]) == hashlib.sha256(b"abcdef").hexdigest()
