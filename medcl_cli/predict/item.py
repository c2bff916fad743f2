"""One input of `medcl predict`: what to segment, how to load it, which files it came from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk


@dataclass
class PredictInput:
    """One volume to segment: its output name, how to load it and which files it came from."""

    name: str
    kind: str  # volume | dicom
    files: list[Path]
    load: Callable[[], sitk.Image]
    display: str  # what logs show (a file name, or the pseudonymous series name for DICOM)
    info: dict[str, Any] = field(default_factory=dict)  # extra sidecar fields from the reader
    frames: list[tuple[Any, int]] = field(default_factory=list)  # DICOM: (data.dicom.source.Source, 0-based frame) per slice
    study: str = ""  # DICOM: StudyInstanceUID (memory only, never written): groups a study's channels
    description: str = ""  # DICOM: SeriesDescription (memory only): what --channels names match
    given: str = ""  # the input path as the user gave it (a file, or the DICOM folder holding the series)
    pseudonym: str = ""  # DICOM: `series_<12 hex>` of the SeriesInstanceUID, the patient identity of a SEG
