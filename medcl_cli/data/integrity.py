"""Integrity checks ITK skips when it reads a volume.

ITK reads a truncated `.nii.gz` without complaint (the missing voxels become zeros) and turns NaN and
infinite voxels of a float NIfTI into 0. Both silently change the data, so medcl checks them itself:
the gzip length is compared with what the header promises (a full streaming decompression only when
they disagree, so multi-member files still pass), and non-finite voxels are counted on the raw file.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
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


DISK_MARGIN = 256 << 10  # a write that failed with less than this free (plus its own size) is a full disk


def raise_if_disk_full(folder: str | Path, needed: int = 0) -> None:
    """Raise OSError(ENOSPC) when `folder`'s file system cannot take `needed` more bytes.

    Called after a write failed: ITK and torch report a full disk as a generic RuntimeError (or not at
    all, leaving a short file), so the CLI could not otherwise give exit 7 with its hint."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed + DISK_MARGIN:
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))


@contextmanager
def atomic_path(path: str | Path, suffix: str, needed: int = 0,
                disk_errors: tuple[type[BaseException], ...] = (RuntimeError, OSError)) -> Iterator[str]:
    """A temporary file beside `path` to write into; renamed onto `path` only when the block succeeds.

    A failure of type `disk_errors` is first checked against the free space (`raise_if_disk_full`, with
    `needed` bytes), so a full disk becomes ENOSPC whatever the writer reported. A failed or interrupted
    write leaves `path` as it was, and the temporary file is removed; only a kill -9 can leave it
    (`.tmp-<pid>-*`), and `remove_stale_temporaries` removes it once that process is gone.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=p.parent)
    os.close(fd)
    try:
        try:
            yield tmp
        except disk_errors:
            raise_if_disk_full(p.parent, needed)
            raise
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


TMP_PREFIX = ".tmp-"


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files `atomic_path` left in `folder` when its process was killed in the middle
    of a write (a partial checkpoint can be hundreds of MB); a live process's are left alone."""
    for p in folder.glob(f"{TMP_PREFIX}*"):
        if _left_by_dead_process(p.name, TMP_PREFIX) and p.is_file():
            p.unlink(missing_ok=True)


def _left_by_dead_process(name: str, prefix: str) -> bool:
    """`name` is `<prefix><pid>-...` and process `pid`, not this one, no longer exists."""
    import re

    m = re.match(re.escape(prefix) + r"(\d+)-", name)
    return m is not None and int(m.group(1)) != os.getpid() and not _process_alive(int(m.group(1)))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def private_tempdir(prefix: str) -> Iterator[Path]:
    """A temporary folder named `<prefix><pid>-...`, removed when the block ends.

    A kill -9 skips that removal, and what these folders hold (volumes converted from DICOM, slice
    copies) should not pile up in /tmp: folders of the same prefix left by processes that no longer
    exist (and owned by this user) are removed first."""
    import shutil

    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            mine = old.is_dir() and old.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and _left_by_dead_process(old.name, prefix):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-") as work:
        yield Path(work)
