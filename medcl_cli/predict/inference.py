"""Segment a 3D volume with a trained network and return the mask on the volume's exact grid.

The path is the one training uses (`data.preprocess`): the volume is normalised and cut into z-slices at
the model size, the slices go through the network in batches (no grad; autocast as in training), the softmax
probabilities are brought back to the original slice grid (`logits_to_volume`), and the argmax becomes a
label image that copies the input's size, spacing, origin and direction (`CopyInformation`). Nothing is
resampled in 3D, so the output lines up with the input voxel for voxel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from medcl_cli.config import DataConfig, InferenceConfig
from medcl_cli.core.runfolder import RunInfoError, read_run_info
from medcl_cli.data.channels import channel_arrays
from medcl_cli.data.preprocess import channel_slices, logits_to_volume
from medcl_cli.engine.device import autocast, resolve_precision
from medcl_cli.errors import InvalidDataError

DEFAULT_BATCH = InferenceConfig().batch_size  # slices per forward pass
# what a checkpoint without a `preprocessing` entry was trained with: the DataConfig defaults
_DATA = DataConfig()
DEFAULT_PREPROCESSING = {"image_size": _DATA.image_size, "resize": _DATA.resize, "normalize": _DATA.normalize}


@dataclass
class LoadedModel:
    """A network ready for inference plus what the outputs must record about it."""

    net: nn.Module
    label_map: dict[int, str]
    preprocessing: dict[str, Any]
    method: str
    stage: str
    run_id: str
    checkpoint: Path
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=lambda: ["image"])  # input channels, in order
    segmentation_trained: bool = True  # the head was trained on masks (predict/fit.py head_trained)
    profile: dict[str, Any] | None = None  # the training data's profile (data/profile.py), when recorded

    @property
    def num_classes(self) -> int:
        return max(self.label_map) + 1 if self.label_map else 1

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def run_dir(self) -> Path:
        """The run folder the checkpoint lies in (the checkpoint file itself when it is outside one)."""
        return self.checkpoint.parent.parent if self.checkpoint.parent.name == "checkpoints" else self.checkpoint


def normalize_label_map(raw: Any) -> dict[int, str]:
    """`{"0": "background", ...}` (JSON keys are strings) as `{0: "background", ...}`."""
    if not raw:
        return {}
    return {int(k): str(v) for k, v in dict(raw).items()}


def _run_info(run: Path, ckpt_path: Path) -> tuple[Path, dict[str, Any]]:
    """The run folder and its run.json (empty when absent or unreadable)."""
    if run.is_dir():
        folder = run
    else:
        folder = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    try:
        return folder, read_run_info(folder)
    except (OSError, RunInfoError):
        return folder, {}


def _run_id(folder: Path, data: dict[str, Any]) -> str:
    """The run's id from run.json when present, else the run folder's name."""
    for key in ("run_id", "id", "name"):
        if isinstance(data.get(key), str) and data[key]:
            return str(data[key])
    return folder.resolve().name


def load_model(run: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The network of a run folder (best.pt, else last.pt) or checkpoint file, in eval mode on `device`."""
    from medcl_cli.engine.checkpoint import load_network, resolve
    from medcl_cli.predict.fit import head_trained

    run = Path(run)
    ckpt_path = resolve(run)
    net, ckpt = load_network(run, device)
    folder, info = _run_info(run, ckpt_path)
    if torch.device(device).type == "cuda":  # channels-last weights: cudnn's fast NHWC kernels, as in training
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub omits it
    label_map = normalize_label_map(ckpt.get("label_map"))
    prep = {**DEFAULT_PREPROCESSING, **dict(ckpt.get("preprocessing") or {})}
    out_channels = _out_channels(net)
    if not label_map:
        label_map = {i: ("background" if i == 0 else f"class_{i}") for i in range(out_channels or 1)}
    if out_channels is not None and out_channels != max(label_map) + 1:
        raise InvalidDataError(
            f"checkpoint {ckpt_path} has {out_channels} output channels but a label map of {len(label_map)} classes",
            "the checkpoint is inconsistent; re-run finetune",
        )
    return LoadedModel(
        net=net,
        label_map=label_map,
        preprocessing=prep,
        method=str(ckpt.get("method", "unknown")),
        stage=str(ckpt.get("stage", "unknown")),
        run_id=_run_id(folder, info),
        checkpoint=ckpt_path,
        device=torch.device(device),
        extra={"step": ckpt.get("step")},
        channel_names=_channel_names(ckpt, net),
        segmentation_trained=head_trained(ckpt, info),
        profile=ckpt.get("data_profile") or info.get("data_profile"),
    )


def _channel_names(ckpt: dict[str, Any], net: nn.Module) -> list[str]:
    """The checkpoint's input channel names; a checkpoint from before channels were recorded has as many
    unnamed channels as its first convolution reads."""
    names = ckpt.get("channel_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    first = next((p for p in net.parameters() if p.ndim >= 3), None)  # the first convolution's weight
    return ["image"] * (int(first.shape[1]) if first is not None else 1)


def _out_channels(net: nn.Module) -> int | None:
    head = getattr(net, "head", None)
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def _logits(out: Any) -> torch.Tensor:
    """The logits of a network output: `NetOut.logits` (models/unet.py) or a plain tensor."""
    return out.logits if hasattr(out, "logits") else out


def forward_slices(net: nn.Module, slices: torch.Tensor, device: torch.device, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(start, probabilities)` for consecutive batches of model slices (Z x 1 x S x S), float32 on CPU."""
    with torch.inference_mode(), autocast(device, resolve_precision("auto", device)):
        for start in range(0, slices.shape[0], batch_size):
            x = slices[start : start + batch_size].to(device, non_blocking=True)
            probs = torch.softmax(_logits(net(x)).float(), dim=1)
            yield start, probs.cpu()


def predict_array(
    net: nn.Module,
    volume_zyx: np.ndarray,
    preprocessing: dict[str, Any],
    device: torch.device,
    batch_size: int = DEFAULT_BATCH,
    num_classes: int | None = None,
) -> np.ndarray:
    """Class ids (uint8, or uint16 beyond 255 classes) of a (z, y, x) volume, or of a (C, z, y, x)
    multi-channel one, on that same (z, y, x) array grid."""
    prep = {**DEFAULT_PREPROCESSING, **preprocessing}
    slices, info = channel_slices(volume_zyx, int(prep["image_size"]), str(prep["resize"]), str(prep["normalize"]))
    dtype = np.uint8 if (num_classes or 256) <= 256 else np.uint16
    out = np.zeros(volume_zyx.shape[-3:], dtype=dtype)
    for start, probs in forward_slices(net, slices, device, max(1, int(batch_size))):
        full = logits_to_volume(probs, info)  # Z_b x K x Y x X on the original slice grid
        out[start : start + full.shape[0]] = full.argmax(dim=1).numpy().astype(dtype)
    return out


def volume_array(image: sitk.Image) -> np.ndarray:
    """The (z, y, x) voxel array of a scalar 2D or 3D image (a 2D image becomes one slice)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidDataError(
            f"expected a scalar (grey-level) image, found {image.GetNumberOfComponentsPerPixel()} components per voxel",
            "convert colour or vector images to one channel first",
        )
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InvalidDataError(
            f"expected a 2D or 3D image, found {dim}D with size {image.GetSize()}",
            "split 4D series (e.g. cine phases) into 3D volumes first",
        )
    arr = sitk.GetArrayFromImage(image)
    return arr[None] if dim == 2 else arr


def predict_image(model: LoadedModel, image: sitk.Image, batch_size: int = DEFAULT_BATCH) -> sitk.Image:
    """The label image of `image`, on its exact grid (size, spacing, origin, direction copied). A run trained
    on C channels reads an image of C components (data/channels.py `stack_channels`)."""
    comps = image.GetNumberOfComponentsPerPixel()
    if model.num_channels > 1 or comps > 1:
        if comps != model.num_channels:
            raise InvalidDataError(
                f"the run was trained on {model.num_channels} channel(s) ({', '.join(model.channel_names)}), "
                f"the input has {comps}",
                f"give one file per channel, in the order {', '.join(model.channel_names)}"
                if model.num_channels > 1 else "give a single-sequence (scalar) volume",
            )
        if image.GetDimension() not in (2, 3):
            volume_array(image)  # the same clear error as for a scalar image
    arr = channel_arrays(image) if model.num_channels > 1 else volume_array(image)
    labels = predict_array(model.net, arr, model.preprocessing, model.device, batch_size, model.num_classes)
    out = sitk.GetImageFromArray(labels[0] if image.GetDimension() == 2 else labels)
    out.CopyInformation(image)
    return out


def sha256_files(paths: list[Path]) -> str:
    """SHA-256 of one file, or of the concatenated contents of several (sorted by path: a DICOM series)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


__all__ = [
    "LoadedModel",
    "forward_slices",
    "load_model",
    "normalize_label_map",
    "predict_array",
    "predict_image",
    "sha256_files",
    "volume_array",
]
