"""DICOM tag look-up, value normalisation and the PHI guard used by `medcl ingest --meta`.

Keywords are checked against pydicom's data dictionary, so a typo is a usage error with a "did you mean"
instead of an empty column. PHI keywords (names, IDs, birth dates, UIDs, institutions, physicians) are
refused unless `--allow-phi`; their values then go to `DATASET/private/` only. `Redactor` removes every
PHI value seen in the headers from strings medcl writes elsewhere (report rows, log lines, file paths).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from typing import Any

from pydicom.datadict import keyword_dict

from medcl_cli.errors import UsageError, did_you_mean

# Attributes that identify a person or link back to one (PS3.15 Annex E basic profile, the ones that matter
# in practice). UIDs are included: they are the key to re-identification through the PACS.
PHI_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientInsurancePlanCodeSequence",
        "MedicalRecordLocator",
        "MilitaryRank",
        "BranchOfService",
        "ResponsiblePerson",
        "ResponsibleOrganization",
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "PhysiciansOfRecord",
        "RequestingPhysician",
        "ScheduledPerformingPhysicianName",
        "OperatorsName",
        "StationName",
        "DeviceSerialNumber",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "MediaStorageSOPInstanceUID",
        "RequestAttributesSequence",
        "PersonName",
        "ContentCreatorName",
        # dates and times of care identify a visit (HIPAA Safe Harbor keeps only the year)
        "StudyDate",
        "SeriesDate",
        "AcquisitionDate",
        "ContentDate",
        "InstanceCreationDate",
        "AcquisitionDateTime",
        "StudyTime",
        "SeriesTime",
        "AcquisitionTime",
        "ContentTime",
    }
)
# PHI read from every header (for redaction, pseudonyms and --allow-phi), whatever --meta asks for.
PHI_READ = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StationName",
    "StudyID",
)
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def resolve_keywords(names: Iterable[str], allow_phi: bool = False) -> list[str]:
    """Validated DICOM keywords in the order given (duplicates dropped).

    Raises UsageError (exit 2) for an unknown keyword (with a suggestion) and for a PHI keyword without
    `allow_phi`.
    """
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name or name in out:
            continue
        if name not in keyword_dict:
            hint = did_you_mean(name, keyword_dict.keys())
            raise UsageError(
                f"--meta: '{name}' is not a DICOM keyword" + (f"; {hint}" if hint else ""),
                "use keywords as in the DICOM dictionary, e.g. PatientAge,SliceLocation,EchoTime",
            )
        if name in PHI_KEYWORDS and not allow_phi:
            raise UsageError(
                f"--meta: '{name}' identifies a patient (PHI) and is refused",
                "drop it, or add --allow-phi: its values then go only to DATASET/private/",
            )
        out.append(name)
    return out


def split_phi(keywords: list[str]) -> tuple[list[str], list[str]]:
    """(public keywords, PHI keywords) of an already validated list."""
    return [k for k in keywords if k not in PHI_KEYWORDS], [k for k in keywords if k in PHI_KEYWORDS]


def format_value(value: Any) -> str:
    """A DICOM element value as one CSV cell: numbers plainly, multi-values joined with a backslash."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return ""  # binary values (OB/OW/UN) are not meta labels
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(format_value(v) for v in value)
    if type(value).__name__ == "Sequence":
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(value) if type(value) is float else str(value)  # DS keeps its original text
    text = str(value).strip()
    return text.replace("\x00", "")


def age_years(raw: str) -> float | None:
    """PatientAge (AS, e.g. `045Y`, `006M`, `010D`) in years; None when empty or malformed."""
    m = _AGE.match(raw or "")
    if not m:
        return None
    return round(int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()], 4)


def normalised_columns(keyword: str, raw: str) -> dict[str, object]:
    """Extra columns shown beside a raw tag value (e.g. PatientAge `045Y` -> PatientAge_years 45)."""
    if keyword == "PatientAge":
        years = age_years(raw)
        return {"PatientAge_years": "" if years is None else (int(years) if years == int(years) else years)}
    if keyword == "PatientSex":
        return {"PatientSex_code": {"M": "M", "F": "F", "O": "O"}.get(raw.strip().upper()[:1], "")}
    return {}


def salted_hash(value: str, salt: str, length: int = 12) -> str:
    """A short, stable pseudonym of `value` that cannot be reversed without the salt."""
    return hashlib.sha256(f"{salt}\x1f{value}".encode()).hexdigest()[:length]


class Redactor:
    """Removes PHI values seen in headers from any text medcl writes outside `private/`."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        for part in re.split(r"[\^\\=]", value or ""):
            part = part.strip()
            # very short or purely numeric tokens (e.g. "1") would redact innocent text
            if len(part) >= 3 and not re.fullmatch(r"[\d.]{1,5}", part):
                self._values.add(part)
                self._pattern = None

    def __call__(self, text: str) -> str:
        if not self._values or not text:
            return text
        if self._pattern is None:
            alts = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in alts), re.IGNORECASE)
        return self._pattern.sub("<redacted>", text)

    def flags(self, text: str) -> bool:
        """True when `text` holds a PHI value seen in the headers, or a calendar date (a date of care)."""
        return bool(text) and (self(text) != text or _DATE.search(text) is not None)

    def scrub(self, text: str) -> str:
        """`text` with the PHI values and the calendar dates in it replaced by `<redacted>` (a path)."""
        return _DATE.sub("<redacted>", self(text)) if text else text

    def keep(self, text: str) -> str:
        """`text` where it is clean, else "": for a field that is worth nothing half-redacted (a series
        description in cases.csv, a class name, an output file name)."""
        return "" if self.flags(text) else text


# 19910304, 1991-03-04, 04.03.1991, 03/04/1991: dates in free text (a series description, a file name)
_DATE = re.compile(r"(?<!\d)(?:(?:19|20)\d\d[-./]?[01]\d[-./]?[0-3]\d|[0-3]?\d[-./][01]?\d[-./](?:19|20)\d\d)(?!\d)")
