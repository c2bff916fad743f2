"""PHI never leaves private/: every PHI tag holds a marker, and every byte ingest writes is scanned for it."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from medcl_cli.cli.app import main
from medcl_cli.data.meta import age_years, normalised_columns, resolve_keywords
from medcl_cli.errors import UsageError
import dicomgen as g

MARK = "ZQXMARK"
BIRTH = "19010203"


def _phi() -> dict[str, str]:
    phi = {k: f"{MARK}{k}" for k in g.PHI_TAGS if k not in ("PatientBirthDate",)}
    phi["PatientName"] = f"{MARK}last^{MARK}first"
    phi["PatientBirthDate"] = BIRTH
    phi["StudyID"] = f"{MARK}S"[:16]
    phi["AccessionNumber"] = f"{MARK}ACC"
    phi["StationName"] = f"{MARK}ST"
    return phi


def _leaks(root: Path, skip_private: bool = True) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if not p.is_file() or (skip_private and "private" in p.relative_to(root).parts):
            continue
        data = p.read_bytes()
        if p.name.endswith(".gz"):
            data = gzip.decompress(data)
        low = data.lower()
        if MARK.lower().encode() in low or BIRTH.encode() in data or b"pid-" in low:
            found.append(str(p.relative_to(root)))
    return found


class Out:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.exit_code, self.stdout, self.stderr, self.output = code, out, err, out + err


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> Out:
    """Run `medcl ARGS` in-process through main() (exit codes as the installed script gives them)."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    cap = capsys.readouterr()
    return Out(int(exc.value.code or 0), cap.out, cap.err)


def _write(tmp: Path) -> Path:
    src = tmp / f"{MARK}PatientID" / "study"  # a folder named after the patient, as real exports do
    g.write_series(src / "s1", g.volume(4), phi=_phi(), description="T1")
    g.write_sr(src / "report.dcm", phi=_phi())
    return tmp / f"{MARK}PatientID"


def test_no_phi_anywhere_in_the_dataset_or_logs(tmp_path, capsys):
    src = _write(tmp_path)
    out = tmp_path / "ds"
    r = cli(capsys, *["ingest", str(src), "--out", str(out), "--meta", "PatientAge,PatientSex,SliceLocation"])
    assert r.exit_code == 0, r.output
    assert MARK.lower() not in r.output.lower()
    assert _leaks(out) == []
    assert not (out / "private").exists()
    report = (out / "ingest_report.csv").read_text()
    assert "<redacted>" in report  # the patient-named folder is redacted, not dropped


def test_allow_phi_writes_phi_only_to_private(tmp_path, capsys):
    src = _write(tmp_path)
    out = tmp_path / "ds"
    r = cli(capsys, *["ingest", str(src), "--out", str(out), "--meta", "PatientName,PatientID,PatientAge",
                                 "--allow-phi"])
    assert r.exit_code == 0, r.output
    assert _leaks(out) == []
    private = _leaks(out, skip_private=False)
    assert private and all(p.startswith("private/") for p in private)
    assert "PatientName" in (out / "private" / "meta_phi.csv").read_text()
    assert MARK in (out / "private" / "id_map.csv").read_text()


def test_phi_keyword_refused_without_allow_phi(tmp_path, capsys):
    src = _write(tmp_path)
    r = cli(capsys, *["ingest", str(src), "--out", str(tmp_path / "ds"), "--meta", "PatientBirthDate"])
    assert r.exit_code == 2
    assert not (tmp_path / "ds").exists()


def test_keywords_checked_against_the_dictionary():
    assert resolve_keywords(["PatientAge", " SliceLocation", "PatientAge"]) == ["PatientAge", "SliceLocation"]
    with pytest.raises(UsageError, match="did you mean 'SliceLocation'"):
        resolve_keywords(["SliceLocaton"])
    with pytest.raises(UsageError, match="PHI"):
        resolve_keywords(["AccessionNumber"])
    assert resolve_keywords(["AccessionNumber"], allow_phi=True) == ["AccessionNumber"]


@pytest.mark.parametrize("raw,years", [("045Y", 45), ("006M", 0.5), ("014D", round(14 / 365.25, 4)),
                                       ("002W", round(14 / 365.25, 4)), ("", None), ("abc", None), ("000Y", 0)])
def test_age_normalisation(raw, years):
    assert age_years(raw) == years
    col = normalised_columns("PatientAge", raw)["PatientAge_years"]
    assert col == ("" if years is None else years)


def test_dates_of_care_are_phi():
    """Study/series/acquisition dates identify a visit (HIPAA Safe Harbor keeps only the year)."""
    from medcl_cli.data.meta import resolve_keywords
    from medcl_cli.errors import UsageError

    for kw in ("StudyDate", "AcquisitionDateTime", "SeriesTime"):
        with pytest.raises(UsageError, match="PHI"):
            resolve_keywords([kw], allow_phi=False)
