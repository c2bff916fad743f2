"""Where a DICOM file comes from: a path on disk, or a member of a zip archive."""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Source:
    """One candidate file: a path, or a member of a zip archive."""

    path: str
    member: str | None = None

    def label(self) -> str:
        return f"{self.path}!{self.member}" if self.member else self.path

    def open(self) -> tuple[Any, int]:
        """A binary file object and its size."""
        if self.member is None:
            return open(self.path, "rb"), os.path.getsize(self.path)
        with zipfile.ZipFile(self.path) as zf:
            data = zf.read(self.member)
        return io.BytesIO(data), len(data)
