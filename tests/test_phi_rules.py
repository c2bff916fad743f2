"""PHI rules from PS3.15 (data/phi.py) and the one Scrubber, on a real series with planted identifiers.

A real T1 series (../shared/data, TCIA brain tumor progression) is copied with pydicom and given a patient
name, ID, birth date, institution, accession number and physician, and free-text tags that repeat them in
other words (`T1 SECRET ID-987654 born 19450101`). Without `--allow-phi-tags` the free-text tags are refused
with exit 2; with it, no identifying substring reaches any file medcl writes, nor its console output.
"""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import pytest
import volumes as V
from test_bad_inputs import tree_digest

from medcl_cli.data.meta import PHI_KEYWORDS, resolve_keywords
from medcl_cli.data.phi import (
    FREE_TEXT,
    IDENTIFIER,
    KEPT,
    Scrubber,
    classify,
    date_forms,
    table_markdown,
)
from medcl_cli.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SERIES = "tcia_brain_tumor_progression_dicom/PGBM-008/06-10-1993-FH-HEADBrain Protocols-26857/13-T1post-21069"
PLANTED = {
    "PatientName": "SECRET^PATIENT",
    "PatientID": "ID-987654",
    "PatientBirthDate": "19450101",
    "OtherPatientIDs": "MRN-55501",
    "AccessionNumber": "ACC-31337",
    "InstitutionName": "Elmwood Clinic",
    "InstitutionAddress": "12 Quarry Lane, Dunmore",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "PatientAge": "095Y",
    "SeriesDescription": "T1 SECRET ID-987654 born 19450101",
    "StudyDescription": "head of patient Secret, 01.01.1945, Elmwood Clinic",
    "ImageComments": "ref. Dr House, acc ACC-31337 / mrn-55501, birth 1945-01-01",
}
# what must never appear in a file medcl writes outside private/ (case-insensitive)
IDENTIFYING = ["secret", "patient^", "987654", "19450101", "1945-01-01", "01.01.1945", "mrn-55501", "acc-31337",
               "elmwood", "quarry", "dunmore", "gregory", "house"]


def _planted_series(shared_data, dest: Path, n: int = 6) -> Path:
    """The first `n` slices of a real series, re-written with the planted values (sources never touched)."""
    import pydicom

    src = shared_data(SERIES)
    files = sorted(src.iterdir())
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))[:n]
    dest.mkdir(parents=True)
    for k, ds in enumerate(slices):
        for kw, value in PLANTED.items():
            setattr(ds, kw, value)
        ds.save_as(dest / f"IM{k:04d}.dcm")
    return dest


def _leaks(root: Path) -> list[str]:
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or "private" in p.relative_to(root).parts:
            continue
        data = p.read_bytes()
        if p.name.endswith(".gz"):
            data = gzip.decompress(data)
        low = data.decode("latin-1").lower()
        found += [f"{p.relative_to(root)}: {w}" for w in IDENTIFYING if w in low]
    return found


def test_rules_follow_the_profile_and_the_vr():
    assert classify("SliceLocation").rule == KEPT and classify("EchoTime").rule == KEPT
    assert classify("PatientAge").rule == KEPT  # Retain Patient Characteristics Option
    for kw in ("SeriesDescription", "StudyDescription", "ImageComments", "ProtocolName", "Manufacturer"):
        assert classify(kw).rule == FREE_TEXT, kw  # removed by the profile, or a free-text VR it does not list
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyInstanceUID", "InstitutionName",
               "AccessionNumber", "OperatorsName"):
        assert classify(kw).rule == IDENTIFIER, kw
    assert classify("SeriesDescription").action == "X" and classify("SeriesDescription").vr == "LO"
    assert classify("PatientID").tag == "(0010,0020)"
    # every identifier of the old hand-written list is still one
    old = {"PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber", "StudyID",
           "InstitutionName", "ReferringPhysicianName", "StationName", "DeviceSerialNumber", "StudyInstanceUID",
           "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "StudyDate", "AcquisitionDateTime"}
    assert old <= PHI_KEYWORDS


def test_refusal_names_tag_reason_and_flag():
    with pytest.raises(UsageError) as exc:
        resolve_keywords(["PatientAge", "SeriesDescription"])
    assert "SeriesDescription" in exc.value.message and "(0008,103E)" in exc.value.message
    assert "X" in exc.value.message and "--allow-phi-tags SeriesDescription" in exc.value.hint
    assert resolve_keywords(["SeriesDescription"], allow_phi_tags=["SeriesDescription"]) == ["SeriesDescription"]
    with pytest.raises(UsageError, match="not asked for by --meta"):
        resolve_keywords(["PatientAge"], allow_phi_tags=["ImageComments"])
    with pytest.raises(UsageError, match="identifier"):
        resolve_keywords(["PatientID"], allow_phi=True, allow_phi_tags=["PatientID"])


def test_scrubber_matches_components_ids_and_date_forms():
    s = Scrubber()
    for v in ("SECRET^PATIENT Jr", "../../ID-987654", "19450101", "Elmwood Clinic"):
        s.add(v)
    text = "T1 secret ID-987654 born 01/01/1945 (1945.01.01) at ELMWOOD clinic; patient jr"
    out = s(text)
    assert all(w not in out.lower() for w in ("secret", "987654", "1945", "elmwood", "patient")), out
    assert "T1" in out and "born" in out and out.endswith(" jr")  # under 3 characters: not matched alone
    assert "01.01.1945" in date_forms("19450101") and date_forms("19451301") == []
    s2 = Scrubber()
    s2.add("1")  # too short to match on its own: never shreds text
    assert s2("T1 slice 1") == "T1 slice 1"


def test_doc_table_matches_the_module():
    doc = (REPO / "docs" / "phi.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- phi-table:start -->\n(.*?)<!-- phi-table:end -->", doc, re.DOTALL)
    assert m, "docs/phi.md lacks the generated table markers"
    assert m.group(1) == table_markdown(), "docs/phi.md is stale: run python -m medcl_cli.data.phi --write docs/phi.md"


def test_free_text_refused_then_scrubbed_on_a_real_series(shared_data, tmp_path, capsys):
    root = tmp_path / "export"
    _planted_series(shared_data, root / "SECRET_PATIENT_ID-987654" / "t1")
    # a broken link whose folder names hold the name, ID, institution and birth date
    odd = root / "SECRET_PATIENT_ID-987654" / "Elmwood Clinic" / "born_19450101"
    odd.mkdir(parents=True)
    (odd / "IM9999.dcm").symlink_to(tmp_path / "gone.dcm")
    meta = "PatientAge,SliceLocation,SeriesDescription,ImageComments,StudyDescription"
    out = tmp_path / "ds"
    before = tree_digest(root)
    code, stdout, err = V.run_cli(capsys, "ingest", str(root), "--out", str(out), "--meta", meta)
    assert code == 2, err
    assert "SeriesDescription" in err and "--allow-phi-tags" in err and not out.exists()

    code, stdout, err = V.run_cli(capsys, "ingest", str(root), "--out", str(out), "--meta", meta,
                                  "--allow-phi-tags", "SeriesDescription,ImageComments,StudyDescription", "--workers", "1")
    assert code == 5, err  # the broken link is a failed input
    assert tree_digest(root) == before and "Traceback" not in err
    assert _leaks(out) == []
    console = (stdout + err).lower()
    assert [w for w in IDENTIFYING if w in console] == []
    with open(out / "meta.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["PatientAge"] for r in rows} == {"90+"} and {r["PatientAge_years"] for r in rows} == {"90"}
    assert rows[0]["SeriesDescription"].startswith("T1 <redacted>") and "born <redacted>" in rows[0]["SeriesDescription"]
    assert "<redacted>" in rows[0]["ImageComments"] and "birth <redacted>" in rows[0]["ImageComments"]
    report = (out / "ingest_report.csv").read_text()
    link_rows = [r for r in report.splitlines() if "broken symbolic link" in r]
    assert len(link_rows) == 1 and "<redacted>" in link_rows[0] and "IM9999.dcm" in link_rows[0]
    assert link_rows[0].startswith("export/") and str(tmp_path) not in report  # relative, like every other row
