"""Compressed DICOM pixel data: which decoder medcl uses for each transfer syntax, and what it says when
that decoder is missing (`failed:codec`, naming the syntax and the package) or rejects the data
(`failed:pixels`). docs/ingest.md#compressed-dicom gives the reasons for each choice.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pydicom

# transfer syntax -> (its name, the pydicom decoding plugin medcl uses for it, the PyPI package behind it,
# the module that package installs). One decoder per syntax, chosen for docs/ingest.md's reasons; never
# pylibjpeg-libjpeg, which decodes a truncated JPEG stream into an image without any error.
DECODERS: dict[str, tuple[str, str, str, str]] = {
    "1.2.840.10008.1.2.4.50": ("JPEG Baseline (process 1)", "gdcm", "python-gdcm", "gdcm"),
    "1.2.840.10008.1.2.4.51": ("JPEG Extended (process 2 and 4)", "gdcm", "python-gdcm", "gdcm"),
    "1.2.840.10008.1.2.4.57": ("JPEG Lossless (process 14)", "gdcm", "python-gdcm", "gdcm"),
    "1.2.840.10008.1.2.4.70": ("JPEG Lossless SV1 (process 14, first-order prediction)", "gdcm", "python-gdcm",
                               "gdcm"),
    "1.2.840.10008.1.2.4.80": ("JPEG-LS Lossless", "pyjpegls", "pyjpegls", "jpeg_ls"),
    "1.2.840.10008.1.2.4.81": ("JPEG-LS Near-Lossless", "pyjpegls", "pyjpegls", "jpeg_ls"),
    "1.2.840.10008.1.2.4.90": ("JPEG 2000 Lossless", "pylibjpeg", "pylibjpeg-openjpeg", "openjpeg"),
    "1.2.840.10008.1.2.4.91": ("JPEG 2000", "pylibjpeg", "pylibjpeg-openjpeg", "openjpeg"),
    "1.2.840.10008.1.2.4.201": ("HTJ2K Lossless", "pylibjpeg", "pylibjpeg-openjpeg", "openjpeg"),
    "1.2.840.10008.1.2.4.202": ("HTJ2K Lossless RPCL", "pylibjpeg", "pylibjpeg-openjpeg", "openjpeg"),
    "1.2.840.10008.1.2.4.203": ("HTJ2K", "pylibjpeg", "pylibjpeg-openjpeg", "openjpeg"),
    "1.2.840.10008.1.2.5": ("RLE Lossless", "pydicom", "pydicom", "pydicom"),
}
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


class CodecError(Exception):
    """No installed decoder handles the file's transfer syntax (failed:codec)."""


class DecodeError(Exception):
    """The decoder rejected the compressed data: damaged or cut short (failed:pixels)."""


def syntax_name(ts: str) -> str:
    if ts in DECODERS:
        return DECODERS[ts][0]
    try:
        name = pydicom.uid.UID(ts).name
    except Exception:  # noqa: BLE001 - a malformed UID is shown as it is
        name = ts
    return name if name and name != ts else "unknown transfer syntax"


def decoder_available(ts: str) -> bool:
    """Whether the decoder medcl uses for `ts` is installed (native syntaxes always are)."""
    import importlib.util

    if ts in NATIVE or ts == "":
        return True
    if ts not in DECODERS:
        return False
    module = DECODERS[ts][3]
    return module == "pydicom" or (importlib.util.find_spec(module) is not None and (
        module != "openjpeg" or importlib.util.find_spec("pylibjpeg") is not None))


def decode_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """The pixel array of a whole dataset, compressed syntaxes through the decoder named for them."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts not in NATIVE and ts != "":
        if not decoder_available(ts):
            if ts in DECODERS:
                package = DECODERS[ts][2] + (" pylibjpeg" if DECODERS[ts][2] == "pylibjpeg-openjpeg" else "")
                raise CodecError(f"{syntax_name(ts)} ({ts}) needs a decoder that is not installed; "
                                 f"install: pip install {package}")
            raise CodecError(f"{syntax_name(ts)} ({ts}): no decoder for this transfer syntax is known to medcl; "
                             "convert the series to an uncompressed syntax (e.g. gdcmconv --raw, dcmdjpeg)")
        if ts == "1.2.840.10008.1.2.4.51" and int(ds.get("BitsStored", 8) or 8) > 8:
            raise CodecError(f"{syntax_name(ts)} ({ts}) with {ds.get('BitsStored')}-bit samples: the python-gdcm "
                             "wheel has no 12-bit JPEG decoder and medcl trusts no other; decompress the series "
                             "first (dcmdjpeg from DCMTK, or dcm2niix)")
        ds.pixel_array_options(decoding_plugin=DECODERS[ts][1])
    log = logging.getLogger("pydicom")
    level = log.level
    log.setLevel(logging.CRITICAL)  # a failed decode is reported in ingest_report.csv, not logged to stderr
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array)
    except Exception as exc:  # decoding failures are classified below
        if ts in DECODERS:
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
            raise DecodeError(f"{syntax_name(ts)} ({ts}) data cannot be decoded by {DECODERS[ts][2]} "
                             f"(damaged or truncated?): {last}") from None
        raise
    finally:
        log.setLevel(level)
