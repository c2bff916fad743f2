"""A fast DICOM header reader for the common case, with pydicom as the fallback whenever it is unsure.

Reading 20 000 headers through `pydicom.dcmread` cost about 1.5 ms a file, mostly in building a
DataElement for every element whether it is used or not. This reader walks the element headers of a
Part 10 file (little endian, explicit or implicit VR) straight from the file bytes, stops at the pixel data
and keeps only where each top-level value lies; a value is converted when it is asked for, with pydicom's
own rules (`values.py`: the values are what pydicom gives, strings stripped the same way, DS keeping its
text, text VRs decoded with the file's SpecificCharacterSet).

`read_raw(fp)` returns None, and the caller reads the file with pydicom, for anything outside that common
case: no `DICM` preamble, big endian or deflated syntaxes, an element that does not parse, and files whose
interesting facts are nested (enhanced multi-frame functional groups, DICOM-SEG references, Siemens
mosaics whose CSA header pydicom decodes). `tests/test_ingest_scale.py` checks that the frames built from
this reader equal those built from pydicom on every real file in the shared data.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, BinaryIO

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.tag import BaseTag

from medcl_cli.data.dicom.values import TEXT_VRS, convert, tag_for

HEAD = 8192  # bytes read first (most headers are shorter); doubled while the header goes on
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH",
             b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}  # anything else: not explicit VR, let pydicom read it
IMPLICIT = "1.2.840.10008.1.2"
NOT_LITTLE = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated: pydicom reads them
STOP = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, FloatPixelData, DoubleFloatPixelData
NESTED = {0x52009230, 0x52009229, 0x00081115}  # per-frame / shared functional groups, ReferencedSeriesSequence
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_U16, _U32, _TAG = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<HH")
_UNDEFINED = 0xFFFFFFFF


class _More(Exception):
    """The header runs past the bytes read so far."""


class _Unsure(Exception):
    """Something this reader does not handle: let pydicom read the file."""


class RawElement:
    __slots__ = ("VR", "tag", "value")

    def __init__(self, tag: int, vr: str, value: Any) -> None:
        self.tag, self.VR, self.value = tag, vr, value


@functools.lru_cache(maxsize=4096)
def _dict_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


class RawHeader:
    """The header elements of one file, converted on access; quacks like the part of `pydicom.Dataset`
    that `frames.frames_of` and `scan.read_header` use: `get(tag)` gives an element with `.value`,
    `get(keyword, default)` gives the value, `in` takes tags and keywords."""

    def __init__(self, buf: bytes, spans: dict[int, tuple[bytes, int, int]], implicit: bool, tsyntax: str,
                 media_sop_class: str, pixel_offset: int) -> None:
        self._buf, self._spans, self._implicit = buf, spans, implicit
        self._cache: dict[int, RawElement] = {}
        self.tsyntax, self.media_sop_class, self.pixel_offset = tsyntax, media_sop_class, pixel_offset
        self._encodings: list[str] | None = None

    def __contains__(self, key: object) -> bool:
        return (tag_for(key) if isinstance(key, str) else int(key)) in self._spans  # type: ignore[call-overload]

    def get(self, key: Any, default: Any = None) -> Any:
        if isinstance(key, str):
            elem = self._element(tag_for(key))
            return default if elem is None else elem.value
        elem = self._element(int(key))
        return default if elem is None else elem

    def __getattr__(self, name: str) -> Any:
        if name[:1].isupper():
            elem = self._element(tag_for(name))
            if elem is not None:
                return elem.value
        raise AttributeError(name)

    def keys(self) -> list[BaseTag]:
        return [BaseTag(t) for t in self._spans]

    def keyword(self, tag: int) -> str:
        return keyword_for_tag(tag)

    def _element(self, tag: int) -> RawElement | None:
        hit = self._cache.get(tag)
        if hit is not None or tag not in self._spans:
            return hit
        vr_bytes, start, length = self._spans[tag]
        vr = _dict_vr(tag) if self._implicit or vr_bytes == b"UN" else vr_bytes.decode("ascii")
        if vr == "UN":
            vr = _dict_vr(tag)
        if " or " in vr:  # US or SS (pixel value tags), OB or OW: as pydicom resolves them
            vr = ("SS" if self.get("PixelRepresentation", 0) == 1 else "US") if vr.startswith("US") else "OB"
        elem = RawElement(tag, vr, self._convert(tag, vr, start, length))
        self._cache[tag] = elem
        return elem

    def _convert(self, tag: int, vr: str, start: int, length: int) -> Any:
        raw = self._buf[start : start + length]
        if vr in TEXT_VRS and self._encodings is None:
            charset = self.get("SpecificCharacterSet") if tag != 0x00080005 else None
            self._encodings = convert_encodings(charset)
        return convert(tag, vr, raw, self._encodings or [], self._implicit, start)


def _elements(buf: bytes, pos: int, implicit: bool, spans: dict[int, tuple[bytes, int, int]] | None) -> int:
    """Walk elements from `pos`. At top level (`spans` given) record where each value lies and return the
    start of the pixel data element, or the buffer's end; inside an item (`spans` None) return the
    position after the item delimiter."""
    n = len(buf)
    while True:
        if pos >= n and spans is not None:
            return n
        if pos + 8 > n:
            raise _More
        group, elem = _TAG.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == 0xFFFEE00D:  # item delimitation
            if spans is not None:
                raise _Unsure
            return pos + 8
        if spans is not None and tag in STOP:
            return pos
        if implicit:
            vr = b""
            length = _U32.unpack_from(buf, pos + 4)[0]
            hdr = 8
        else:
            vr = buf[pos + 4 : pos + 6]
            if vr in LONG_VRS:
                if pos + 12 > n:
                    raise _More
                length = _U32.unpack_from(buf, pos + 8)[0]
                hdr = 12
            elif vr in SHORT_VRS:
                length = _U16.unpack_from(buf, pos + 6)[0]
                hdr = 8
            else:
                raise _Unsure  # not explicit VR after all, or damaged
        start = pos + hdr
        if length == _UNDEFINED:
            if (vr and vr not in (b"SQ", b"UN")) or (not vr and _dict_vr(tag) not in ("SQ", "UN")):
                raise _Unsure  # undefined length outside a sequence (encapsulated data before pixels)
            pos = _skip_sequence(buf, start, implicit)
            if spans is not None:
                spans[tag] = (b"SQ", start, 0)
            continue
        if start + length > n:
            raise _More
        if spans is not None:
            spans[tag] = (vr, start, length)
        pos = start + length


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """Past an undefined-length sequence starting at its first item; returns the position after its
    sequence delimiter."""
    n = len(buf)
    while True:
        if pos + 8 > n:
            raise _More
        group, elem = _TAG.unpack_from(buf, pos)
        length = _U32.unpack_from(buf, pos + 4)[0]
        tag = group << 16 | elem
        if tag == 0xFFFEE0DD:
            return pos + 8
        if tag != 0xFFFEE000:
            raise _Unsure
        if length == _UNDEFINED:
            pos = _elements(buf, pos + 8, implicit, None)
        else:
            if pos + 8 + length > n:
                raise _More
            pos += 8 + length


def _meta(buf: bytes) -> tuple[dict[int, str], int]:
    """File meta group 0002 (always explicit VR little endian): {tag: text value} and where it ends."""
    pos = 132
    out: dict[int, str] = {}
    n = len(buf)
    while pos + 8 <= n:
        group, elem = _TAG.unpack_from(buf, pos)
        if group != 2:
            return out, pos
        vr = buf[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            length, hdr = _U32.unpack_from(buf, pos + 8)[0], 12
        else:
            length, hdr = _U16.unpack_from(buf, pos + 6)[0], 8
        if length == _UNDEFINED or pos + hdr + length > n:
            raise _More
        if elem in (0x0002, 0x0010):
            out[elem] = buf[pos + hdr : pos + hdr + length].decode("ascii", "replace").rstrip("\x00 ")
        pos += hdr + length
    raise _More


def parse(buf: bytes, complete: bool) -> RawHeader:
    """The header in `buf` (raises _More when it needs more bytes, _Unsure to give up); `complete`: buf
    holds the whole file."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _Unsure
    meta, pos = _meta(buf)
    tsyntax = meta.get(0x0010, "")
    if not tsyntax or tsyntax in NOT_LITTLE:
        raise _Unsure
    implicit = tsyntax == IMPLICIT
    spans: dict[int, tuple[bytes, int, int]] = {}
    end = _elements(buf, pos, implicit, spans)
    if end >= len(buf) and not complete:
        raise _More
    pixel = end  # the pixel data element's start, or the file's end when it has none (as pydicom's tell())
    if any(t in spans for t in NESTED):
        raise _Unsure
    return RawHeader(buf, spans, implicit, tsyntax, meta.get(0x0002, ""), pixel)


def read_raw(fp: BinaryIO) -> RawHeader | None:
    """The header of an open Part 10 file, or None when pydicom should read it (see module docstring).
    The file position is left anywhere: the caller seeks back before a fallback."""
    try:
        buf = fp.read(HEAD)
        complete = len(buf) < HEAD
        while True:
            try:
                hdr = parse(buf, complete)
                break
            except _More:
                if complete:  # the file ends inside its header: pydicom says how
                    return None
                want = len(buf)  # double what is read, so a long header costs few passes
                more = fp.read(want)
                complete = len(more) < want
                buf += more
    except (_Unsure, struct.error, UnicodeDecodeError):
        return None
    if hdr.media_sop_class == "1.2.840.10008.1.3.10" or str(hdr.get("SOPClassUID", "")) == SEG_SOP_CLASS:
        return None  # DICOMDIR, DICOM-SEG: rare, nested; pydicom reads them
    try:
        modality = str(hdr.get("Modality", "") or "").upper()
        image_type = hdr.get("ImageType") or []
        if modality == "SEG" or "MOSAIC" in [str(v).strip().upper() for v in
                                             (image_type if isinstance(image_type, list | tuple) or
                                              type(image_type).__name__ == "MultiValue" else [image_type])]:
            return None
    except Exception:  # noqa: BLE001 - a value pydicom may read differently: let it
        return None
    return hdr
