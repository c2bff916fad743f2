"""DICOMDIR: the index a CD/DVD or PACS media export carries (PS3.10 File-set).

Its directory records name the image files by ReferencedFileID, path components relative to the
DICOMDIR's folder (upper case, 8 characters, often without extension). The walk reads every file anyway,
so the index adds two things: the files it references are read even when the walk would not reach them
(the DICOMDIR itself given as the input), and referenced files that are missing are reported, one row
each, instead of silently shortening a series. Media copied by case-folding tools keep the names in
another case: a reference is matched case-insensitively before it is called missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DicomdirIndex:
    """What one DICOMDIR references: files found, references missing, and why it was unreadable."""

    path: Path
    found: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)
    error: str = ""


def is_dicomdir_name(p: Path) -> bool:
    return p.name.upper() == "DICOMDIR"


def _resolve(base: Path, parts: list[str]) -> Path | None:
    """base/parts..., matching each component case-insensitively when the exact name is absent."""
    here = base
    for part in parts:
        exact = here / part
        if exact.exists():
            here = exact
            continue
        try:
            match = [c for c in here.iterdir() if c.name.upper() == part.upper()] if here.is_dir() else []
        except OSError:
            match = []
        if not match:
            return None
        here = match[0]
    return here if here.is_file() else None


def read_dicomdir(path: Path) -> DicomdirIndex:
    """Every ReferencedFileID of every directory record, resolved against the DICOMDIR's folder."""
    import pydicom

    index = DicomdirIndex(path)
    try:
        ds = pydicom.dcmread(path, force=True)
        records = ds.get("DirectoryRecordSequence") or []
        refs = []
        for rec in records:
            ref = rec.get("ReferencedFileID")
            if ref is None or ref == "":
                continue
            parts = [str(ref)] if isinstance(ref, str) else [str(v) for v in ref]
            parts = [p.strip() for p in parts if p.strip()]
            if parts and not any(p in ("..", ".") or "/" in p or "\\" in p for p in parts):
                refs.append(parts)
            elif parts:
                index.error = f"ReferencedFileID {'/'.join(parts)!r} leaves the DICOMDIR's folder; ignored"
    except Exception as exc:  # noqa: BLE001 - a damaged index is reported; the walk still reads the files
        index.error = f"DICOMDIR cannot be read ({type(exc).__name__}: {exc}); its folder is read file by file"
        return index
    base = path.parent
    seen: set[str] = set()
    for parts in refs:
        key = "/".join(p.upper() for p in parts)
        if key in seen:
            continue
        seen.add(key)
        hit = _resolve(base, parts)
        if hit is None:
            index.missing.append(base.joinpath(*parts))
        else:
            index.found.append(hit)
    return index
