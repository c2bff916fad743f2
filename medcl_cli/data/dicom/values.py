"""One DICOM element value from its bytes, as pydicom would give it, for `rawheader`.

pydicom's converters are used as they are, except where they spend their time validating values only to
warn (`UID`, `IS` and `DSfloat` match every value against a pattern) or building objects medcl only turns
into text (`PersonName`, `MultiValue`): there the same value is built directly. DS values are floats that
print as the text they were read from (as `DSfloat` does); text in ASCII under an ASCII-compatible
character set is decoded directly; anything else (other character sets, AT, OB ...) goes through
`pydicom.values.convert_value`. When pydicom is configured to raise on invalid values, or to convert dates
or numbers to other types, its converters run for everything.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from pydicom import config
from pydicom import values as pv
from pydicom.charset import default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import IS

NUMBERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
PLAIN = {"CS": pv.convert_string, "AS": pv.convert_string, "DA": pv.convert_DA_string,
         "TM": pv.convert_TM_string, "DT": pv.convert_DT_string, "UI": pv.convert_UI,
         "DS": pv.convert_DS_string, "IS": pv.convert_IS_string}  # pydicom's own converters, one per VR
TEXT_VRS = {"LO", "SH", "UC", "PN", "LT", "ST", "UT"}  # text VRs decoded with the file's character set
ASCII_SUPERSETS = {"iso8859", "latin_1", "iso_ir_6", "ascii", "UTF8", "utf_8", "iso8859_2", "iso8859_3",
                   "iso8859_4", "iso8859_5", "iso8859_6", "iso8859_7", "iso8859_8", "iso8859_9", "iso8859_11",
                   "iso8859_15", "tis_620", "GB18030", "GBK", "cp1252"}


def _split(text: str, kind: Any = None) -> Any:
    """pydicom's multi_string: trailing padding off, split on backslash, one value or a list."""
    items = text.rstrip(" \x00").split("\\")
    if kind is not None:
        items = [kind(v) for v in items]
    return items[0] if len(items) == 1 else items


def _is(text: str) -> Any:
    return IS(text, config.IGNORE)


class _DS(float):
    """A DS value: a float that prints as the text it was read from, like pydicom's DSfloat (which also
    validates the text, at ten times the cost, only to warn)."""

    original_string: str

    def __str__(self) -> str:
        return self.original_string


def _ds(text: str) -> Any:
    text = text.strip()
    if not text:
        return text
    value = _DS(text)
    value.original_string = text
    return value


def _plain(vr: str, raw: bytes) -> Any:
    """The value of a plain-ASCII VR as pydicom's converter gives it, minus the validation it does only to
    warn (its cost was most of the header time: `UID` and `IS` check every value against a pattern). When
    pydicom is set to raise on invalid values, or to convert dates, its own converter runs."""
    if (config.settings.reading_validation_mode == config.RAISE or config.datetime_conversion
            or config.use_DS_numpy or config.use_IS_numpy or config.use_DS_decimal):
        return PLAIN[vr](raw, True)
    text = raw.decode(default_encoding)
    if vr == "UI":
        return _split(text.rstrip("\0 "))
    if vr == "IS":
        return _split(text, _is)
    if vr == "DS":
        return _split(text.strip(), _ds)
    return _split(text)


def convert(tag: int, vr: str, raw: bytes, encodings: list[str], implicit: bool, offset: int) -> Any:
    """The value of one element (`encodings`: the file's, from convert_encodings; needed for text VRs)."""
    length = len(raw)
    if vr in NUMBERS:
        fmt = NUMBERS[vr]
        size = struct.calcsize(fmt)
        if length == 0:
            return None
        if length % size:
            raise ValueError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has {length} bytes for VR {vr}")
        vals = struct.unpack(f"<{length // size}{fmt}", raw)
        return vals[0] if len(vals) == 1 else list(vals)
    if vr == "SQ":
        return Sequence()
    if length == 0:
        return "" if vr in PLAIN or vr in TEXT_VRS or vr in ("AE", "UR") else None
    if vr in PLAIN:
        return _plain(vr, raw)
    if vr in TEXT_VRS and raw.isascii() and all(e in ASCII_SUPERSETS for e in encodings):
        text = raw.decode("ascii")  # what pydicom's text converters give, as str
        if vr in ("LT", "ST", "UT"):
            return text.rstrip("\0 ")
        items = [v.rstrip("\0 ") for v in text.split("\\")]
        return items[0] if len(items) == 1 else items
    elem = RawDataElement(BaseTag(tag), vr, length, raw, offset, implicit, True)
    return pv.convert_value(vr, elem, encodings or None)


@functools.cache
def tag_for(keyword: str) -> BaseTag:
    """The tag of a DICOM keyword (cached: called per element read); KeyError for an unknown keyword."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return BaseTag(tag)
