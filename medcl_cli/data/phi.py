"""PHI rules for `medcl ingest --meta`, from DICOM PS3.15 Annex E, and the one Scrubber of identifying text.

Every keyword `--meta` may name is classified by its Basic Application Level Confidentiality Profile action
(PS3.15 Table E.1-1: D dummy, Z zero or dummy, X remove, K keep, C clean, U new UID, and their
combinations) and its Value Representation (pydicom's data dictionary):

- `identifier`: names (VR PN), dates and times (DA, DT, TM: HIPAA Safe Harbor keeps only the year),
  UIDs the profile replaces (U), IDs, addresses, institution and device identity. Refused unless
  `--allow-phi`; their values then go to `DATASET/private/` only, verbatim.
- `free-text`: any other attribute the profile removes, empties or cleans, and any attribute of a
  free-text VR (LO, LT, ST, UT, SH, PN, UC) it does not list: such text may hold anything, names and IDs
  included. Refused unless `--allow-phi-tags TAG`; their values then go to `meta.csv` scrubbed.
- `kept`: everything else (coded and numeric values: SliceLocation, EchoTime, Modality, ...) and the
  patient characteristics of the profile's Retain Patient Characteristics Option (age, sex, size,
  weight), PatientAge with ages over 89 written as `90+`.

`Scrubber` is the one mechanism that removes identifying values seen in the headers (every component of
PatientName and the other names, PatientID and the other IDs, the birth date in its usual written forms,
accession number, institution name and address, station, physicians) from text medcl writes: allowed
free-text meta values, every ingest_report.csv row, log lines and the HTML report. It matches substrings,
case-insensitively. `python -m medcl_cli.data.phi --write docs/phi.md` refreshes the table docs/phi.md carries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from medcl_cli.core.report import Reporter

FREE_TEXT_VRS = frozenset({"LO", "LT", "ST", "UT", "SH", "PN", "UC"})
TIME_VRS = frozenset({"DA", "DT", "TM"})

# PS3.15 Table E.1-1, Basic Profile column, for the attributes an image header carries (patient, study,
# series, equipment, institution, operator, dates and times, UIDs, comments and descriptions).
BASIC_PROFILE: dict[str, str] = {
    # patient
    "PatientName": "Z", "PatientID": "Z", "IssuerOfPatientID": "X", "PatientBirthDate": "Z",
    "PatientBirthTime": "X", "PatientSex": "Z", "PatientAge": "X", "PatientSize": "X", "PatientWeight": "X",
    "OtherPatientIDs": "X", "OtherPatientIDsSequence": "X", "OtherPatientNames": "X", "PatientBirthName": "X",
    "PatientMotherBirthName": "X", "PatientAddress": "X", "PatientTelephoneNumbers": "X",
    "PatientInsurancePlanCodeSequence": "X", "MedicalRecordLocator": "X", "MilitaryRank": "X",
    "BranchOfService": "X", "EthnicGroup": "X", "Occupation": "X", "SmokingStatus": "X",
    "PregnancyStatus": "X", "AdditionalPatientHistory": "X", "PatientComments": "X", "MedicalAlerts": "X",
    "Allergies": "X", "PatientReligiousPreference": "X", "PatientState": "X", "ResponsiblePerson": "X",
    "ResponsibleOrganization": "X", "LastMenstrualDate": "X", "AdmissionID": "X",
    "AdmittingDiagnosesDescription": "X",
    # study and request
    "StudyInstanceUID": "U", "StudyID": "Z", "AccessionNumber": "Z", "StudyDate": "Z", "StudyTime": "Z",
    "StudyDescription": "X", "ReferringPhysicianName": "Z", "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X", "PhysiciansOfRecord": "X", "NameOfPhysiciansReadingStudy": "X",
    "RequestingPhysician": "X", "RequestedProcedureDescription": "X/Z", "RequestedProcedureID": "X",
    "RequestAttributesSequence": "X", "ReasonForStudy": "X", "ImagingServiceRequestComments": "X",
    "ScheduledProcedureStepDescription": "X", "ScheduledProcedureStepID": "X",
    "ScheduledPerformingPhysicianName": "X", "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepID": "X", "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    # series, instance, acquisition
    "SeriesInstanceUID": "U", "SOPInstanceUID": "U", "MediaStorageSOPInstanceUID": "U",
    "FrameOfReferenceUID": "U", "SynchronizationFrameOfReferenceUID": "U", "InstanceCreatorUID": "U",
    "ReferencedSOPInstanceUID": "U", "IrradiationEventUID": "U", "ConcatenationUID": "U",
    "DimensionOrganizationUID": "U", "StorageMediaFileSetUID": "U", "DeviceUID": "U",
    "SeriesDate": "X/D", "SeriesTime": "X/D", "AcquisitionDate": "X/Z", "AcquisitionTime": "X/Z",
    "AcquisitionDateTime": "X/Z", "ContentDate": "Z/D", "ContentTime": "Z/D", "InstanceCreationDate": "X/D",
    "InstanceCreationTime": "X/Z/D", "TimezoneOffsetFromUTC": "X", "SeriesDescription": "X",
    "ProtocolName": "X/D", "AcquisitionComments": "X", "AcquisitionDeviceProcessingDescription": "X/D",
    "DerivationDescription": "X", "ImageComments": "X", "ImagePresentationComments": "X",
    "ContrastBolusAgent": "Z/D", "TextValue": "X", "TextString": "X", "ContentCreatorName": "Z",
    "PersonName": "D", "ReferencedImageSequence": "X/Z/U*", "SourceImageSequence": "X/Z/U*",
    "OriginalAttributesSequence": "X",
    # equipment, institution, operators
    "InstitutionName": "X/Z/D", "InstitutionAddress": "X", "InstitutionalDepartmentName": "X",
    "StationName": "X/Z/D", "DeviceSerialNumber": "X/Z/D", "DetectorID": "X/D", "GantryID": "X/D",
    "PlateID": "X", "CassetteID": "X", "SoftwareVersions": "X", "DateOfLastCalibration": "X",
    "TimeOfLastCalibration": "X", "OperatorsName": "X/Z/D", "PerformingPhysicianName": "X",
}

# Attributes that identify a person, a visit or a device by themselves (beyond the PN/DA/DT/TM VRs and the
# U action): with --allow-phi they go to private/, never into meta.csv even scrubbed.
IDENTITY = frozenset({
    "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence", "PatientAddress",
    "PatientTelephoneNumbers", "PatientInsurancePlanCodeSequence", "MedicalRecordLocator", "MilitaryRank",
    "BranchOfService", "ResponsiblePerson", "ResponsibleOrganization", "AdmissionID", "StudyID",
    "AccessionNumber", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "RequestedProcedureID", "RequestAttributesSequence", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "DetectorID", "GantryID", "PlateID", "CassetteID",
})

# PS3.15 Retain Patient Characteristics Option (K): what label-efficient studies stratify by.
RETAINED = frozenset({"PatientAge", "PatientSex", "PatientSize", "PatientWeight", "PregnancyStatus",
                      "SmokingStatus"})

# PHI read from every header (for the Scrubber, pseudonyms and --allow-phi), whatever --meta asks for.
PHI_READ = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "StationName", "StudyID",
)

KEPT, FREE_TEXT, IDENTIFIER = "kept", "free-text", "identifier"


@dataclass(frozen=True)
class TagRule:
    keyword: str
    tag: str  # "(0010,1010)"
    vr: str
    action: str  # the Basic Profile action, "" when the profile does not list the attribute
    rule: str  # KEPT, FREE_TEXT or IDENTIFIER
    why: str


def _tag_and_vr(keyword: str) -> tuple[str, str]:
    from pydicom.datadict import dictionary_VR, keyword_dict

    tag = keyword_dict[keyword]
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})", str(dictionary_VR(tag)).split(" or ")[0]


def classify(keyword: str) -> TagRule:
    """The rule for one DICOM keyword (it must be in pydicom's dictionary)."""
    tag, vr = _tag_and_vr(keyword)
    action = BASIC_PROFILE.get(keyword, "")
    listed = f"Basic Profile action {action}" if action else "not listed by the Basic Profile"
    if keyword in RETAINED:
        why = "kept by the Retain Patient Characteristics Option"
        if keyword == "PatientAge":
            why += "; ages over 89 are written as 90+ (HIPAA Safe Harbor)"
        return TagRule(keyword, tag, vr, action, KEPT, why)
    if vr == "PN" or vr in TIME_VRS or keyword in IDENTITY or action.startswith("U"):
        what = {"PN": "a person's name", "DA": "a date", "DT": "a date and time", "TM": "a time of care",
                "UI": "a UID that links back to the PACS"}.get(vr, "an identifier")
        return TagRule(keyword, tag, vr, action, IDENTIFIER, f"{what}; {listed}")
    if action:
        what = "free text that may hold names, IDs and dates" if vr in FREE_TEXT_VRS else "context the profile removes"
        return TagRule(keyword, tag, vr, action, FREE_TEXT, f"{listed} (VR {vr}): {what}")
    if vr in FREE_TEXT_VRS:
        return TagRule(keyword, tag, vr, action, FREE_TEXT, f"free-text VR {vr}: may hold names, IDs and dates")
    return TagRule(keyword, tag, vr, action, KEPT, f"coded or numeric VR {vr}; {listed}")


def table_markdown() -> str:
    """The table docs/phi.md carries: every attribute the profile lists, plus the VR rule for the rest."""
    lines = ["| keyword | tag | VR | PS3.15 basic profile | medcl | why |", "|---|---|---|---|---|---|"]
    for kw in sorted(BASIC_PROFILE):
        r = classify(kw)
        medcl = {KEPT: "kept in meta.csv", FREE_TEXT: "refused; `--allow-phi-tags` -> meta.csv, scrubbed",
                 IDENTIFIER: "refused; `--allow-phi` -> private/ only"}[r.rule]
        lines.append(f"| {r.keyword} | {r.tag} | {r.vr} | {r.action} | {medcl} | {r.why} |")
    lines.append("| any other keyword of VR LO, LT, ST, UT, SH, UC | | | not listed | refused; `--allow-phi-tags` "
                 "-> meta.csv, scrubbed | free text may hold names, IDs and dates |")
    lines.append("| any other keyword of VR PN, DA, DT, TM | | | not listed | refused; `--allow-phi` -> private/ "
                 "only | names, dates and times of care |")
    lines.append("| any other keyword (CS, DS, IS, US, FD, ...) | | | not listed | kept in meta.csv | coded or "
                 "numeric values |")
    return "\n".join(lines) + "\n"


_NAME_SPLIT = re.compile(r"[\^\\=/,;\s]+")
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
REDACTED = "<redacted>"


def date_forms(yyyymmdd: str) -> list[str]:
    """A DICOM date (DA) in the forms people type it: 19450101, 1945-01-01, 01.01.1945, 01/01/1945, ..."""
    m = _DATE.match(yyyymmdd.strip())
    if not m:
        return []
    y, mo, d = m.groups()
    if not (1 <= int(mo) <= 12 and 1 <= int(d) <= 31):
        return []
    forms = {f"{y}{mo}{d}"}
    for sep in "-/.":
        forms |= {f"{y}{sep}{mo}{sep}{d}", f"{d}{sep}{mo}{sep}{y}", f"{mo}{sep}{d}{sep}{y}"}
    return sorted(forms)


class Scrubber:
    """Removes identifying values seen in headers from any text medcl writes outside `private/`.

    `add` takes one header value (a name, an ID, a date, an institution): the whole value and each of its
    components (split on ^ = \\ / , ; and spaces) are matched as substrings, case-insensitively; a
    YYYYMMDD date also in its usual written forms. Components under 3 characters and short numbers (up to
    5 digits) are not matched on their own: they would shred innocent text.
    """

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        value = (value or "").strip()
        parts = [value, *_NAME_SPLIT.split(value)]
        for part in parts:
            part = part.strip(" .-_")
            for form in [part, *date_forms(part)]:
                if len(form) >= 3 and not re.fullmatch(r"[\d.]{1,5}", form):
                    self._values.add(form.lower())
                    self._pattern = None

    def add_header(self, phi: Mapping[str, str]) -> None:
        for v in phi.values():
            self.add(v)

    def add_all(self, values: Iterable[str]) -> None:
        for v in values:
            self.add(v)

    def __call__(self, text: str) -> str:
        if not self._values or not text:
            return text
        if self._pattern is None:
            alts = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in alts), re.IGNORECASE)
        return self._pattern.sub(REDACTED, text)

    def flags(self, text: str) -> bool:
        """True when `text` holds an identifying value seen in the headers, or a calendar date (a date of care)."""
        return bool(text) and (self(text) != text or _DATE_IN_TEXT.search(text) is not None)

    def scrub(self, text: str) -> str:
        """`text` with the identifying values and the calendar dates in it replaced (a path as given)."""
        return _DATE_IN_TEXT.sub(REDACTED, self(text)) if text else text

    def keep(self, text: str) -> str:
        """`text` where it is clean, else "": for a field that is worth nothing half-redacted (a series
        description in cases.csv, a class name, an output file name)."""
        return "" if self.flags(text) else text


# 19910304, 1991-03-04, 04.03.1991, 03/04/1991: dates in free text (a series description, a file name)
_DATE_IN_TEXT = re.compile(r"(?<!\d)(?:(?:19|20)\d\d[-./]?[01]\d[-./]?[0-3]\d|[0-3]?\d[-./][01]?\d[-./](?:19|20)\d\d)(?!\d)")


class ScrubbedReporter:
    """A Reporter (core/report.py) whose log lines go through a Scrubber first."""

    def __init__(self, inner: Reporter, scrub: Callable[[str], str]) -> None:
        self.inner, self.scrub = inner, scrub

    def log(self, message: str, level: str = "info") -> None:
        self.inner.log(self.scrub(message), level)

    def start(self, task: str, total: int | None) -> None:
        self.inner.start(task, total)

    def advance(self, task: str, n: int = 1, **fields: object) -> None:
        self.inner.advance(task, n, **fields)

    def finish(self, task: str) -> None:
        self.inner.finish(task)


START, END = "<!-- phi-table:start -->\n", "<!-- phi-table:end -->"


def with_table(doc: str) -> str:
    """`doc` (docs/phi.md) with the text between its table markers replaced by `table_markdown()`."""
    head, _, rest = doc.partition(START)
    _, _, tail = rest.partition(END)
    return head + START + table_markdown() + END + tail


if __name__ == "__main__":  # pragma: no cover - by hand: python -m medcl_cli.data.phi [--write docs/phi.md]
    import sys
    from pathlib import Path

    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        doc = Path(sys.argv[2])
        doc.write_text(with_table(doc.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(table_markdown(), end="")
