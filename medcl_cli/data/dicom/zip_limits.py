"""Bounds on what a zip archive may expand to, checked on its directory before any member is read.

A 1 MB zip can declare gigabytes of zeros (a zip bomb): reading its members (`Source.open` reads one
member into memory) would take minutes and all the memory. The sizes the directory declares are what
Python's zipfile will decompress at most (a member that inflates past its declared size fails its CRC), so
checking them bounds memory and time. An image archive compresses DICOM 1.5-10x; the limits leave a wide
margin for real series and refuse what only a crafted archive holds.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence

MAX_MEMBER = 2 << 30  # bytes one member may expand to (a large enhanced multi-frame CT stays below)
MAX_TOTAL = 64 << 30  # bytes the whole archive may expand to
MAX_RATIO = 200  # expanded / compressed size of one member, checked when it expands past RATIO_FROM
RATIO_FROM = 16 << 20
STATUS = "failed:zip-limit"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def member_problem(info: zipfile.ZipInfo) -> str:
    """Why one member is refused, or "" when it is within the bounds."""
    size, packed = info.file_size, max(info.compress_size, 1)
    if size > MAX_MEMBER:
        return f"zip member expands to {_mib(size)}, over the {_mib(MAX_MEMBER)} limit per member (zip bomb?)"
    if size > RATIO_FROM and size / packed > MAX_RATIO:
        return (f"zip member expands {size / packed:.0f}x ({_mib(packed)} -> {_mib(size)}), over the {MAX_RATIO}x "
                "limit (zip bomb?)")
    return ""


def archive_problem(infos: Sequence[zipfile.ZipInfo]) -> str:
    """Why the whole archive is refused (its total), or ""."""
    total = sum(i.file_size for i in infos)
    if total > MAX_TOTAL:
        return f"zip archive expands to {_mib(total)}, over the {_mib(MAX_TOTAL)} limit (zip bomb?)"
    return ""
