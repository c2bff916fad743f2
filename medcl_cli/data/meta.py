"""DICOM tag look-up, value normalisation and the PHI guard used by `medcl ingest --meta`.

Keywords are checked against pydicom's data dictionary, so a typo is a usage error with a "did you mean"
instead of an empty column. Each keyword is then classified by data/phi.py (PS3.15 Basic Profile action and
VR): identifiers are refused unless `--allow-phi` (their values then go to `DATASET/private/` only), free
text unless `--allow-phi-tags TAG` (their values then go to meta.csv through the Scrubber).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from typing import Any

from pydicom.datadict import keyword_dict

from medcl_cli.data.phi import (
    BASIC_PROFILE,
    FREE_TEXT,
    IDENTIFIER,
    PHI_READ,
    Scrubber,
    classify,
)
from medcl_cli.errors import UsageError, did_you_mean

__all__ = ["PHI_KEYWORDS", "PHI_READ", "Redactor", "Scrubber", "age_years", "format_value", "meta_cells",
           "normalised_columns", "resolve_keywords", "salted_hash", "scrubbed_keywords", "split_phi"]

# The identifiers of the PS3.15 Basic Profile (data/phi.py): what --allow-phi sends to private/ and what the
# DICOM SEG writer removes from its copy of the source header.
PHI_KEYWORDS: frozenset[str] = frozenset(k for k in BASIC_PROFILE if classify(k).rule == IDENTIFIER)
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def resolve_keywords(names: Iterable[str], allow_phi: bool = False, allow_phi_tags: Iterable[str] = ()) -> list[str]:
    """Validated DICOM keywords in the order given (duplicates dropped).

    Raises UsageError (exit 2) for an unknown keyword (with a suggestion), for an identifier without
    `allow_phi`, for a free-text tag not named in `allow_phi_tags`, and for an `allow_phi_tags` entry that
    --meta does not ask for or that is an identifier.
    """
    allowed = [t.strip() for t in allow_phi_tags if t.strip()]
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
        rule = classify(name)
        if rule.rule == IDENTIFIER and not allow_phi:
            raise UsageError(
                f"--meta: '{name}' {rule.tag} identifies a patient (PHI: {rule.why}) and is refused",
                "drop it, or add --allow-phi: its values then go only to DATASET/private/",
            )
        if rule.rule == FREE_TEXT and name not in allowed:
            raise UsageError(
                f"--meta: '{name}' {rule.tag} is refused as possible PHI ({rule.why})",
                f"drop it, or add --allow-phi-tags {name}: its values then go to meta.csv with this patient's "
                "name, IDs, birth date, accession number and institution scrubbed out (docs/phi.md)",
            )
        out.append(name)
    for name in allowed:
        if name not in out:
            raise UsageError(f"--allow-phi-tags: '{name}' is not asked for by --meta",
                             f"add it to --meta ({','.join([*out, name])}) or drop it from --allow-phi-tags")
        if classify(name).rule == IDENTIFIER:
            raise UsageError(f"--allow-phi-tags: '{name}' is an identifier and cannot go to meta.csv, even scrubbed",
                             "use --allow-phi instead: its values then go only to DATASET/private/")
    return out


def split_phi(keywords: list[str]) -> tuple[list[str], list[str]]:
    """(public keywords, PHI keywords) of an already validated list; free-text tags (allowed by
    --allow-phi-tags) are public and scrubbed (`scrubbed_keywords`)."""
    return ([k for k in keywords if classify(k).rule != IDENTIFIER],
            [k for k in keywords if classify(k).rule == IDENTIFIER])


def scrubbed_keywords(keywords: list[str]) -> list[str]:
    """The public keywords whose values go through the Scrubber before meta.csv."""
    return [k for k in keywords if classify(k).rule == FREE_TEXT]


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


AGE_CAP = 90  # HIPAA Safe Harbor: ages over 89 are aggregated into one "90 or older" category


def meta_cells(keyword: str, raw: str) -> dict[str, object]:
    """The meta.csv cells of one tag value: the value itself (PatientAge over 89 as `90+`) and its
    normalised columns (`normalised_columns`, PatientAge_years capped at 90)."""
    cells: dict[str, object] = {keyword: raw, **normalised_columns(keyword, raw)}
    years = age_years(raw) if keyword == "PatientAge" else None
    if years is not None and years >= AGE_CAP:
        cells[keyword], cells["PatientAge_years"] = f"{AGE_CAP}+", AGE_CAP
    return cells


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


Redactor = Scrubber  # the one scrubber (data/phi.py); the old name stays for the DICOM modules
