"""NIfTI integrity checks ITK skips when it reads a volume: a truncated gzip stream, NaN/inf voxels."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

_CHUNK = 1 << 20


def _vox_offset(path: Path) -> int | None:
    """Bytes before the voxels in an uncompressed NIfTI-1/2 stream (None when not NIfTI)."""
    try:
        with gzip.open(path, "rb") as fh:
            head = fh.read(540)
    except (OSError, EOFError):
        return None
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            return int(struct.unpack(order + "f", head[108:112])[0])
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            return int(struct.unpack(order + "q", head[168:176])[0])
    return None


def _stream_complete(path: Path) -> bool:
    """True when every gzip member of `path` decompresses to its end-of-stream marker (bounded memory)."""
    with open(path, "rb") as fh:
        dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                return dec.eof
            while chunk:
                try:
                    dec.decompress(chunk, _CHUNK)
                except zlib.error:
                    return False
                chunk = dec.unconsumed_tail
                if dec.eof:
                    rest = dec.unused_data
                    dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    chunk = rest + chunk
                    if not chunk:
                        nxt = fh.read(_CHUNK)
                        if not nxt:
                            return True
                        chunk = nxt


def gzip_truncated(path: Path, image: sitk.Image) -> bool:
    """Whether a `.nii.gz` that ITK read is cut short (its voxels would be zero-filled)."""
    if not path.name.lower().endswith(".gz"):
        return False
    size = path.stat().st_size
    if size < 18:
        return True
    with open(path, "rb") as fh:
        fh.seek(size - 4)
        isize = struct.unpack("<I", fh.read(4))[0]
    offset = _vox_offset(path)
    if offset is not None:
        nbytes = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
        if isize == (offset + nbytes) % (1 << 32):
            return False
    return not _stream_complete(path)


def nonfinite_voxels(path: Path, image: sitk.Image) -> int:
    """NaN/inf voxels of a float volume, counted on the raw file (0 for integer volumes)."""
    if sitk.GetArrayViewFromImage(image).dtype.kind != "f":
        return 0
    low = path.name.lower()
    if low.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        # nibabel annotates load() as FileBasedImage, which lacks .dataobj (every image it returns has it)
        arr = np.asarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
    else:
        arr = sitk.GetArrayViewFromImage(image)
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))
