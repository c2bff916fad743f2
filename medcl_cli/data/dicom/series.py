"""Grouping frames into volumes and checking their geometry, from headers alone.

Frames are grouped by StudyInstanceUID and SeriesInstanceUID, then split further on orientation, matrix
size, echo and image type (as dcm2niix does). Slices are ordered by the projection of ImagePositionPatient
on the slice normal (row x column cosines), never by InstanceNumber. A series whose positions all repeat k
times is 4D: it is split into k 3D volumes by time point. Gaps, duplicate positions, variable spacing and
gantry tilt are detected here and turned into a `SeriesPlan` that `volume` executes.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from medcl_cli.config import IngestConfig
from medcl_cli.data.dicom.frames import Frame

POSITION_TOL = 0.01  # mm: two slices closer than this along the normal share a position


@dataclass
class SeriesPlan:
    """One output volume: frames sorted along the normal plus the geometry and corrections to apply."""

    study: str
    series: str
    series_number: str
    description: str
    modality: str
    patient: str  # raw PatientID (memory only; hashed before anything is written)
    frames: list[Frame]
    role: str = "image"  # image | mask
    status: str = "ok"
    reason: str = ""
    flags: list[str] = field(default_factory=list)
    row: tuple[float, ...] = (1.0, 0.0, 0.0)
    col: tuple[float, ...] = (0.0, 1.0, 0.0)
    normal: tuple[float, ...] = (0.0, 0.0, 1.0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, ...] = (0.0, 0.0, 0.0)
    positions: list[float] = field(default_factory=list)  # mm along the normal, per frame
    resample_to: list[float] | None = None  # output positions when the spacing varied
    shifts: list[tuple[float, float]] | None = None  # per-slice (x, y) pixel shift undoing a gantry tilt
    duplicates: bool = False
    time_index: int | None = None
    n_times: int = 1
    mosaic: int = 0  # tiles per mosaic image (Siemens), 0 otherwise
    sub: str = ""  # why the series was split (echo/type/orientation), shown in the report

    def sort_key(self) -> tuple[object, ...]:
        num = float(self.series_number) if re.fullmatch(r"-?\d+(\.\d+)?", self.series_number or "") else 1e12
        return (self.patient, self.study, num, self.series, self.sub, self.time_index or 0)

    @property
    def files(self) -> list[str]:
        return sorted({f.source.label() for f in self.frames})


def _subgroup_key(f: Frame) -> tuple[object, ...]:
    iop = tuple(round(v, 3) for v in f.iop) if f.iop else None
    return (iop, f.rows, f.cols, f.echo, f.image_type, bool(f.mosaic_n))


def _describe_split(keys: list[tuple[object, ...]], key: tuple[object, ...]) -> str:
    names = ("orientation", "matrix", "matrix", "echo", "type", "mosaic")
    parts = []
    for i, name in enumerate(names):
        if len({k[i] for k in keys}) > 1:
            value: object = key[i]
            if name == "type" and isinstance(value, tuple):
                value = "/".join(str(v) for v in value)
            if name == "orientation":
                value = "iop" + str(sorted({str(k[0]) for k in keys}).index(str(key[0])))
            parts.append(f"{name}={value}")
    return ",".join(dict.fromkeys(parts))


def _time_key(f: Frame) -> tuple[float, ...]:
    def v(x: float | None) -> float:
        return x if x is not None else math.inf

    return (v(f.temporal), v(f.acquisition), v(f.trigger), v(f.instance), float(f.index))


def _new_plan(frames: list[Frame], role: str, sub: str) -> SeriesPlan:
    f0 = frames[0]
    patient = f0.phi.get("PatientID") or f0.phi.get("PatientName") or f0.study
    return SeriesPlan(
        study=f0.study, series=f0.series, series_number=f0.series_number, description=f0.description,
        modality=f0.modality, patient=patient, frames=frames, role=role, sub=sub,
    )


def plan_series(frames: list[Frame], cfg: IngestConfig, label_regex: str | None = None) -> list[SeriesPlan]:
    """Every image frame grouped into SeriesPlans (status ok, ignored:* or failed:*)."""
    by_series: dict[tuple[str, str], list[Frame]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    copies: dict[tuple[str, str], int] = defaultdict(int)
    for f in sorted(frames, key=lambda f: (f.source.label(), f.index)):
        if f.kind != "image":
            continue
        if f.sop_uid and (f.sop_uid, f.index) in seen:  # the same instance exported twice
            copies[(f.study, f.series)] += 1
            continue
        seen.add((f.sop_uid, f.index))
        by_series[(f.study, f.series)].append(f)
    pattern = re.compile(label_regex) if label_regex else None
    plans: list[SeriesPlan] = []
    for (_, _), members in by_series.items():
        role = "mask" if pattern is not None and pattern.search(members[0].description or "") else "image"
        groups: dict[tuple[object, ...], list[Frame]] = defaultdict(list)
        for f in members:
            groups[_subgroup_key(f)].append(f)
        keys = list(groups)
        for key in sorted(keys, key=str):
            sub = _describe_split(keys, key) if len(keys) > 1 else ""
            for plan in _plan_group(groups[key], cfg, role, sub):
                n_copies = copies.get((plan.study, plan.series), 0)
                if n_copies:
                    plan.flags.append(f"{n_copies} copy(ies) of already seen SOP instances ignored")
                plans.append(plan)
    plans.sort(key=SeriesPlan.sort_key)
    return plans


def _plan_group(frames: list[Frame], cfg: IngestConfig, role: str, sub: str) -> list[SeriesPlan]:
    frames = sorted(frames, key=lambda f: (f.source.label(), f.index))
    plan = _new_plan(frames, role, sub)
    forced = len({f.source.label() for f in frames if f.forced})
    if forced:
        plan.flags.append(f"{forced} file(s) without the DICOM preamble read with force")
    if any("LOCALIZER" in f.image_type for f in frames) and not cfg.keep_localizers:
        plan.status, plan.reason = "ignored:localizer", "ImageType LOCALIZER (scout), dropped"
        return [plan]
    if any(f.iop is None or f.ipp is None or f.spacing is None for f in frames):
        plan.status = "failed:no-geometry"
        plan.reason = "ImagePositionPatient/ImageOrientationPatient/PixelSpacing missing, geometry unknown"
        if frames[0].nframes > 1:
            plan.reason = "multi-frame object without per-frame functional groups: slice positions unknown"
        return [plan]
    bad = _bad_geometry(frames)
    if bad:
        plan.status, plan.reason = "failed:geometry", bad
        return [plan]
    iop = np.asarray(frames[0].iop, dtype=np.float64)
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    if frames[0].mosaic_n or "MOSAIC" in frames[0].image_type:
        return _plan_mosaic(frames, plan, row, col, normal)
    ipp = np.asarray([f.ipp for f in frames], dtype=np.float64)
    proj = ipp @ normal
    order = np.lexsort((np.arange(len(frames)), proj))
    proj, ipp = proj[order], ipp[order]
    frames = [frames[i] for i in order]
    cluster = np.concatenate([[0], np.cumsum(np.diff(proj) > POSITION_TOL)])
    counts = np.bincount(cluster)
    out: list[SeriesPlan] = []
    if counts.size > 0 and counts.min() == counts.max() and counts[0] > 1:
        k = int(counts[0])
        per_pos: list[list[int]] = [[] for _ in range(counts.size)]
        for i, c in enumerate(cluster):
            per_pos[c].append(i)
        for members in per_pos:
            members.sort(key=lambda i: _time_key(frames[i]))
        for t in range(k):
            idx = [members[t] for members in per_pos]
            p = _new_plan([frames[i] for i in idx], role, sub)
            p.flags.extend(plan.flags)
            p.time_index, p.n_times = t, k
            p.flags.append(f"4D: time point {t + 1} of {k}")
            out.append(_geometry(p, ipp[idx], proj[idx], row, col, normal, cfg))
        return out
    plan.frames = frames
    if counts.max() > 1:
        plan.duplicates = True
    return [_geometry(plan, ipp, proj, row, col, normal, cfg)]


def _bad_geometry(frames: list[Frame]) -> str:
    """Why the geometry tags contradict themselves ("" when they are usable): a degenerate or
    non-orthogonal ImageOrientationPatient, non-positive PixelSpacing, non-finite positions."""
    iop = np.asarray(frames[0].iop, dtype=np.float64)
    if iop.shape != (6,) or not np.isfinite(iop).all():
        return f"ImageOrientationPatient {list(frames[0].iop or ())} is not six finite numbers"
    row, col = iop[:3], iop[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 1e-6 or nc < 1e-6 or abs(float(row @ col)) / (nr * nc) > 0.01:
        return f"ImageOrientationPatient {iop.round(4).tolist()}: row and column directions are not orthogonal"
    spacing = np.asarray([f.spacing for f in frames], dtype=np.float64)
    if not np.isfinite(spacing).all() or float(spacing.min()) <= 0:
        return f"PixelSpacing {list(frames[0].spacing or ())} is not positive"
    if not np.isfinite(np.asarray([f.ipp for f in frames], dtype=np.float64)).all():
        return "ImagePositionPatient holds non-finite values"
    return ""


def _geometry(
    plan: SeriesPlan, ipp: np.ndarray, proj: np.ndarray, row: np.ndarray, col: np.ndarray, normal: np.ndarray,
    cfg: IngestConfig,
) -> SeriesPlan:
    """Spacing, origin, gaps, variable spacing and tilt of frames already sorted along the normal."""
    f0 = plan.frames[0]
    dy, dx = cast(tuple[float, float], f0.spacing)  # Optional on Frame; unpacking None fails as before
    plan.row, plan.col, plan.normal = tuple(row), tuple(col), tuple(normal)
    plan.origin = tuple(float(v) for v in ipp[0])
    plan.positions = [float(v) for v in proj]
    uniq = proj[np.concatenate([[True], np.diff(proj) > POSITION_TOL])]
    if uniq.size < 2:
        dz = f0.between or f0.thickness or 1.0
        plan.spacing = (float(dx), float(dy), float(dz))
        if not cfg.keep_localizers:
            plan.status, plan.reason = "ignored:localizer", "one slice only (localizer or single image), dropped"
        return plan
    steps = np.diff(uniq)
    med = float(np.median(steps))
    plan.spacing = (float(dx), float(dy), med)
    big = np.nonzero(steps > cfg.gap_factor * med)[0]
    if big.size:
        missing = int(round(float(np.sum(steps[big] / med - 1))))
        where = ", ".join(f"after slice {int(i)} ({steps[i]:.2f} mm)" for i in big[:3])
        plan.status = "failed:gap"
        plan.reason = f"about {missing} missing slice(s): step {where} vs median {med:.2f} mm"
        return plan
    if float(steps.max() - steps.min()) > cfg.spacing_tolerance * med:
        n_out = int(round((uniq[-1] - uniq[0]) / med)) + 1
        plan.resample_to = [float(uniq[0] + k * med) for k in range(n_out)]
        plan.flags.append(f"variable spacing {steps.min():.3f}-{steps.max():.3f} mm resampled to {med:.3f} mm")
    shift = ipp - ipp[0] - np.outer(proj - proj[0], normal)
    px = np.stack([shift @ row / dx, shift @ col / dy], axis=1)
    if float(np.abs(px).max()) > 0.01:
        along = float(proj[-1] - proj[0])
        angle = math.degrees(math.atan2(float(np.linalg.norm(shift[-1])), along))
        if not cfg.resample_tilt:
            plan.status = "failed:tilt"
            plan.reason = f"gantry tilt {angle:.2f} deg (slices sheared), resampling is off"
            return plan
        plan.shifts = [(float(a), float(b)) for a, b in px]
        plan.flags.append(f"gantry tilt {angle:.2f} deg resampled to an orthogonal grid")
    return plan


def _plan_mosaic(frames: list[Frame], plan: SeriesPlan, row: np.ndarray, col: np.ndarray,
                 normal: np.ndarray) -> list[SeriesPlan]:
    """A Siemens mosaic: each file is one 3D volume (time point) of `mosaic_n` tiles."""
    f0 = frames[0]
    n = f0.mosaic_n
    if not n:
        plan.status = "failed:mosaic"
        plan.reason = "Siemens MOSAIC without NumberOfImagesInMosaic (CSA header unreadable)"
        return [plan]
    tiles = math.ceil(math.sqrt(n))
    if f0.rows % tiles or f0.cols % tiles:
        plan.status, plan.reason = "failed:mosaic", f"mosaic {f0.rows}x{f0.cols} does not split into {tiles}x{tiles}"
        return [plan]
    dy, dx = cast(tuple[float, float], f0.spacing)  # Optional on Frame; unpacking None fails as before
    sn = np.asarray(f0.mosaic_normal, dtype=np.float64) if f0.mosaic_normal else normal
    frames = sorted(frames, key=_time_key)
    out = []
    for t, f in enumerate(frames):
        p = _new_plan([f], plan.role, plan.sub)
        p.mosaic = n
        p.row, p.col, p.normal = tuple(row), tuple(col), tuple(sn / np.linalg.norm(sn))
        # IPP of a mosaic is the corner of the whole mosaic; move it to the corner of the first tile
        half = np.array([(f.cols - f.cols / tiles) / 2 * dx, (f.rows - f.rows / tiles) / 2 * dy])
        origin = np.asarray(f.ipp) + row * half[0] + col * half[1]
        p.origin = tuple(float(v) for v in origin)
        p.spacing = (float(dx), float(dy), float(f.between or f.thickness or 1.0))
        p.positions = [float(origin @ p.normal + k * p.spacing[2]) for k in range(n)]
        if len(frames) > 1:
            p.time_index, p.n_times = t, len(frames)
            p.flags.append(f"4D: time point {t + 1} of {len(frames)}")
        p.flags.append(f"Siemens mosaic of {n} slices")
        out.append(p)
    return out
