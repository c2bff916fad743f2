"""One `Frame` per 2D image in a DICOM file: classic single-frame files give one, enhanced multi-frame
objects give one per frame, read through their per-frame and shared functional groups (position,
orientation, spacing, rescale, frame type, echo, temporal index). Every later step (grouping, sorting,
4D splitting, meta.csv) works on frames only, so single- and multi-frame data follow one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pydicom

from medcl_cli.data.dicom.values import tag_for
from medcl_cli.data.meta import PHI_READ, format_value

if TYPE_CHECKING:
    from medcl_cli.data.dicom.source import Source

NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "DOC", "FID", "RAW", "RWV", "PLAN"}
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(slots=True)  # 20 000 of them stay in memory until the series are planned
class Frame:
    """The header facts of one 2D image, enough to group, sort and convert it without re-reading."""

    source: Source
    index: int  # frame index inside the file (0 for single-frame files)
    nframes: int
    kind: str  # image | seg | other
    sop_class: str
    sop_uid: str
    modality: str
    study: str
    series: str
    series_number: str
    description: str
    image_type: tuple[str, ...]
    rows: int
    cols: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    spacing: tuple[float, float] | None  # (row spacing = y, column spacing = x), mm
    thickness: float | None
    between: float | None  # SpacingBetweenSlices
    echo: float | None
    temporal: float | None
    acquisition: float | None
    instance: float | None
    trigger: float | None
    slope: float
    intercept: float
    tsyntax: str
    gantry_tilt: float
    mosaic_n: int = 0
    mosaic_normal: tuple[float, ...] | None = None
    forced: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    phi: dict[str, str] = field(default_factory=dict)
    refs: tuple[str, ...] = ()  # SEG: referenced SeriesInstanceUIDs
    pixel_offset: int = -1  # byte offset of this frame's pixels for the fast raw path (-1: decode with pydicom)
    dtype: str = ""  # numpy dtype of the stored pixels on the fast path
    bits_stored: int = 0


def _f(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _get(ds: pydicom.Dataset, keyword: str, default: Any = None) -> Any:
    """ds.<keyword> through a cached integer tag: keyword look-ups were a third of the header-scan time."""
    elem = ds.get(tag_for(keyword))
    return default if elem is None else elem.value


def _has(ds: pydicom.Dataset, keyword: str) -> bool:
    return tag_for(keyword) in ds


def _flatten(item: Any) -> dict[str, Any]:
    """keyword -> value of one per-frame/shared functional-group item (one level of sequences deep)."""
    flat: dict[str, Any] = {}
    if item is None:
        return flat
    for elem in item:
        if elem.VR == "SQ" and elem.value:
            for sub in elem.value[0]:
                if sub.VR != "SQ":
                    flat.setdefault(sub.keyword, sub.value)
        elif elem.VR != "SQ":
            flat.setdefault(elem.keyword, elem.value)
    return flat


def _lookup(keyword: str, frame_item: dict[str, Any], shared: dict[str, Any], ds: pydicom.Dataset) -> Any:
    for source in (frame_item, shared):
        v = source.get(keyword)
        if v is not None:
            return v
    return _get(ds, keyword)


def _mosaic(ds: pydicom.Dataset) -> tuple[int, tuple[float, ...] | None]:
    """(number of tiles, slice normal) of a Siemens mosaic, from the CSA header (0 if unknown)."""
    n, normal = 0, None
    try:
        from nibabel.nicom import csareader

        csa = csareader.get_csa_header(ds, "image")
        if csa:
            n = int(csareader.get_n_mosaic(csa) or 0)
            sn = csareader.get_slice_normal(csa)
            normal = None if sn is None else tuple(float(v) for v in sn)
    except Exception:  # noqa: BLE001 - a damaged CSA header falls back to the public tag
        n = 0
    if not n and (0x0019, 0x100A) in ds:
        try:
            n = int(ds[(0x0019, 0x100A)].value)
        except (TypeError, ValueError):
            n = 0
    return n, normal


RAW_SYNTAXES = {"1.2.840.10008.1.2": 8, "1.2.840.10008.1.2.1": 12}  # little endian -> pixel element header bytes


def _raw_layout(ds: pydicom.Dataset, tsyntax: str, offset: int) -> tuple[int, str, int, int]:
    """(first pixel byte, numpy dtype, bits stored, bytes per frame) when pixels can be read raw, else -1."""
    header = RAW_SYNTAXES.get(tsyntax)
    alloc = int(_get(ds, "BitsAllocated", 0) or 0)
    if (header is None or offset < 0 or int(_get(ds, "SamplesPerPixel", 1) or 1) != 1 or alloc not in (8, 16, 32)
            or _has(ds, "FloatPixelData") or _has(ds, "DoubleFloatPixelData")):
        return -1, "", 0, 0
    signed = int(_get(ds, "PixelRepresentation", 0) or 0) == 1
    dtype = f"<{'i' if signed else 'u'}{alloc // 8}"
    stored = int(_get(ds, "BitsStored", alloc) or alloc)
    return offset + header, dtype, stored, int(_get(ds, "Rows")) * int(_get(ds, "Columns")) * alloc // 8


def frames_of(ds: pydicom.Dataset, src: Source, keywords: tuple[str, ...], tsyntax: str, forced: bool,
              pixel_offset: int = -1) -> list[Frame]:
    """The frames of one header-only dataset (see module docstring)."""
    modality = str(_get(ds, "Modality", "") or "").upper()
    sop_class = str(_get(ds, "SOPClassUID", ""))
    phi = {k: format_value(v) for k in PHI_READ if (v := _get(ds, k)) not in (None, "")}
    if sop_class == SEG_SOP_CLASS or modality == "SEG":
        kind = "seg"
    elif modality in NON_IMAGE_MODALITIES or not _has(ds, "Rows"):
        kind = "other"
    else:
        kind = "image"
    refs: tuple[str, ...] = ()
    if kind == "seg":
        refs = tuple(str(it.get("SeriesInstanceUID", "")) for it in _get(ds, "ReferencedSeriesSequence", []) or [])
    image_type = tuple(str(v).strip().upper() for v in (_get(ds, "ImageType") or []))
    mosaic_n, mosaic_normal = (0, None)
    if kind == "image" and "MOSAIC" in image_type:
        mosaic_n, mosaic_normal = _mosaic(ds)
    base: dict[str, Any] = dict(
        source=src,
        kind=kind,
        sop_class=sop_class,
        sop_uid=str(_get(ds, "SOPInstanceUID", "")),
        modality=modality,
        study=str(_get(ds, "StudyInstanceUID", "")),
        series=str(_get(ds, "SeriesInstanceUID", "")),
        series_number=format_value(_get(ds, "SeriesNumber")),
        description=format_value(_get(ds, "SeriesDescription")),
        rows=int(_get(ds, "Rows", 0) or 0),
        cols=int(_get(ds, "Columns", 0) or 0),
        tsyntax=tsyntax,
        gantry_tilt=_f(_get(ds, "GantryDetectorTilt")) or 0.0,
        mosaic_n=mosaic_n,
        mosaic_normal=mosaic_normal,
        forced=forced,
        phi=phi,
        refs=refs,
    )
    if kind != "image":
        return [
            Frame(index=0, nframes=int(_get(ds, "NumberOfFrames", 1) or 1), image_type=image_type, iop=None, ipp=None,
                  spacing=None, thickness=None, between=None, echo=None, temporal=None, acquisition=None,
                  instance=None, trigger=None, slope=1.0, intercept=0.0, tags={}, **base)
        ]
    first_pixel, dtype, bits_stored, frame_bytes = _raw_layout(ds, tsyntax, pixel_offset)
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    shared_seq = _get(ds, "SharedFunctionalGroupsSequence")
    shared = _flatten(shared_seq[0]) if shared_seq else {}
    nframes = int(_get(ds, "NumberOfFrames", 1) or 1)
    items: list[Any] = list(per_frame) if per_frame else [None]
    frames = []
    for i, raw_item in enumerate(items):
        item = _flatten(raw_item)
        frame_type = _lookup("FrameType", item, shared, ds) if per_frame else None
        ftype = tuple(str(v).strip().upper() for v in frame_type) if frame_type else image_type
        tags = {}
        for k in keywords:
            tags[k] = format_value(_lookup(k, item, shared, ds))
        temporal = _f(item.get("TemporalPositionIndex"))
        if temporal is None:
            temporal = _f(_get(ds, "TemporalPositionIdentifier"))
        echo = _f(_lookup("EffectiveEchoTime", item, shared, ds)) if per_frame else None
        if echo is None:
            echo = _f(_get(ds, "EchoNumbers"))
        frames.append(
            Frame(
                index=i,
                nframes=nframes,
                image_type=ftype,
                iop=_floats(_lookup("ImageOrientationPatient", item, shared, ds), 6),
                ipp=_floats(_lookup("ImagePositionPatient", item, shared, ds), 3),
                spacing=cast("tuple[float, float] | None", _floats(_lookup("PixelSpacing", item, shared, ds), 2)),
                thickness=_f(_lookup("SliceThickness", item, shared, ds)),
                between=_f(_lookup("SpacingBetweenSlices", item, shared, ds)),
                echo=echo,
                temporal=temporal,
                acquisition=_f(_get(ds, "AcquisitionNumber")),
                instance=_f(_get(ds, "InstanceNumber")),
                trigger=_f(_lookup("TriggerTime", item, shared, ds) if per_frame else _get(ds, "TriggerTime")),
                slope=_f(_lookup("RescaleSlope", item, shared, ds)) or 1.0,
                intercept=_f(_lookup("RescaleIntercept", item, shared, ds)) or 0.0,
                tags=tags,
                pixel_offset=first_pixel + i * frame_bytes if first_pixel >= 0 else -1,
                dtype=dtype,
                bits_stored=bits_stored,
                **base,
            )
        )
    return frames
