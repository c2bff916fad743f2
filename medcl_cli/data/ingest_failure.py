"""The error of an ingest that produced no case: it names what was found and gives a hint that fits it.

"no usable image found (failed:codec x1)" tells a user nothing; the report rows do (the transfer syntax and
the package that decodes it, "4D volume (16 x 16 x 4 x 3 ...); ingest it with --frames ...", a non-orthonormal
direction, no pixel data).
The first failing rows are quoted (already scrubbed, paths shown relative to the input) and the hint is
chosen from the first one's status and reason. The report itself is written by the caller in every case.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from medcl_cli.errors import InputNotFoundError, InvalidDataError, MedclError

SHOWN = 3
GENERIC_HINT = "point ingest at DICOM folders, zips or NIfTI/NRRD/MHA files"


class Row(Protocol):
    source: str
    status: str
    reason: str


# (status prefix or reason fragment, hint); the first match wins
_HINTS: tuple[tuple[str, str], ...] = (
    ("no decoder for this transfer syntax", "decompress the series first (gdcmconv --raw, dcmdjpeg) and run ingest again"),
    ("12-bit samples", "decompress the series first (dcmdjpeg from DCMTK) and run ingest again"),
    ("failed:codec", "install the decoder package named above (pip install ...) and run ingest again"),
    ("cannot be decoded by", "the compressed pixel data are damaged or cut short: export the series again"),
    ("failed:4d", ("run ingest again with --frames split (one case per frame, <case>_f00, _f01, ...; one "
                   "patient) or --frames N (frame N only, 0-based)")),
    ("failed:nonfinite", "the file holds no finite voxel: export it again"),
    ("labels one frame", "ingest the labelled frame alone: --frames N (0-based) instead of --frames split"),
    ("one label frame per image frame", "give the 4D label as many frames as its image, or a 3D label with --frames N"),
    ("orthonormal", "the image orientation is not a rotation: fix the header (sform/qform, ImageOrientationPatient)"),
    ("failed:no-pixels", "the file holds no pixel data (a header-only or non-image object): point ingest at the image series"),
    ("PixelData", "the file holds no pixel data (a header-only or non-image object): point ingest at the image series"),
    ("pixel data", "the file holds no pixel data (a header-only or non-image object): point ingest at the image series"),
    ("failed:truncated", "the file is incomplete: copy or export it again"),
    ("failed:zip-limit", "the archive expands far beyond what images need: unpack it yourself only if you trust it"),
    ("broken symbolic link", "the link's target is missing: restore it or point ingest at the real files"),
    ("failed:corrupt", "the file is damaged: export it again from the PACS"),
    ("failed:tilt", "gantry-tilted series need resampling: see docs/dicom-troubleshooting.md"),
    ("failed:gap", "slices are missing from the series: export the whole series again"),
)


def hint_for(status: str, reason: str) -> str:
    for key, hint in _HINTS:
        if status.startswith(key) or key in reason:
            return hint
    return GENERIC_HINT


# readable inputs that are not what a case needs: invalid data (exit 4), not "nothing found" (exit 3)
_INVALID = ("failed:4d", "failed:nonfinite")


def nothing_usable(rows: Sequence[Row], inputs: Sequence[Path], report: Path,
                   scrub: Callable[[str], str]) -> MedclError:
    """The error of an ingest with no case: the first failing rows' reasons and a fitting hint; exit 4 when
    every failure is a readable volume medcl refused (4D without --frames), else exit 3."""
    counts = Counter(r.status for r in rows)
    why = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "no files"
    where = ", ".join(str(p) for p in inputs)
    failed = [r for r in rows if r.status.startswith("failed")]
    if not failed:
        return InputNotFoundError(scrub(f"no usable image found in {where} ({why}); report: {report}"), GENERIC_HINT)
    quoted = "; ".join(f"{r.source}: {r.reason or r.status}" for r in failed[:SHOWN])
    more = f" (and {len(failed) - SHOWN} more)" if len(failed) > SHOWN else ""
    message = f"no usable image found in {where} ({why}): {quoted}{more}; report: {report}"
    kind = InvalidDataError if all(r.status in _INVALID for r in failed) else InputNotFoundError
    return kind(scrub(message), hint_for(failed[0].status, failed[0].reason))
