"""PHI across the whole pipeline: a DICOM export whose every PHI attribute (and the patient folder names)
holds a marker goes through ingest -> finetune -> evaluate (with overlays) -> predict on the DICOM folder
(NIfTI and DICOM SEG) -> export (nnU-Net and MONAI) -> runs. Every byte written (CSV, JSON, YAML, logs,
checkpoints and their zip members, NIfTI after gunzip, PNG text chunks, DICOM SEG) and everything printed on
stdout/stderr is scanned for the marker: it appears nowhere. With `ingest --allow-phi --meta PatientID` it
appears only under DATASET/private/, and nothing downstream copies private/ anywhere.
"""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from pathlib import Path

import pydicom
import pytest

import dicomgen as g
import volumes as V
from medcl_cli.demo.dicom_writer import MASK_DESCRIPTION, label_names_option, write_demo_dicom

MARK = "QZXPHIMARK"
BIRTH = "19010203"
NEEDLES = (MARK.lower().encode(), BIRTH.encode())


def _phi_values(patient: int) -> dict[str, str]:
    phi = {k: f"{MARK}{k[:6]}{patient}" for k in g.PHI_TAGS}
    phi["PatientName"] = f"{MARK}Last{patient}^{MARK}First"
    phi["PatientBirthDate"] = BIRTH
    phi["StudyID"] = f"{MARK}{patient}"[:16]
    phi["StationName"] = f"{MARK}{patient}"[:16]
    phi["AccessionNumber"] = f"{MARK}A{patient}"[:16]
    return phi


def write_phi_export(root: Path) -> Path:
    """The demo's cine-MR DICOM (with mask series), every PHI attribute replaced by a marker and each patient
    folder renamed to its marker PatientID, as real exports name them."""
    tmp = root.parent / "demo-tmp"
    demo = write_demo_dicom(tmp, n_patients=3, labelled=3, n_slices=4, size=32, seed=3)
    for i, pid in enumerate(demo.labelled_patients + demo.unlabelled_patients):
        phi = _phi_values(i)
        for f in sorted((tmp / pid).rglob("*")):
            if f.is_file():
                ds = pydicom.dcmread(f)
                for key, value in phi.items():
                    setattr(ds, key, value)
                ds.save_as(f)
        (tmp / pid).rename(tmp / phi["PatientID"])
    tmp.rename(root)
    return root


def leaks(data: bytes, where: str) -> list[str]:
    """Places inside one file's bytes that hold a marker: raw, gunzipped, zip members, PNG text chunks."""
    found = [where] if any(n in data.lower() for n in NEEDLES) else []
    if data[:2] == b"\x1f\x8b":
        try:
            found += leaks(gzip.decompress(data), where + "!gunzip")
        except (OSError, EOFError):
            pass
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                found += [f"{where}!{name}"] if any(n in name.lower().encode() for n in NEEDLES) else []
                found += leaks(zf.read(name), f"{where}!{name}")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        pos = 8
        while pos + 8 <= len(data):
            n = int.from_bytes(data[pos : pos + 4], "big")
            kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
            if kind in (b"zTXt", b"iTXt"):
                head, _, rest = body.partition(b"\x00")
                text = rest[1:] if kind == b"zTXt" else rest[2:].split(b"\x00", 2)[-1]
                try:
                    text = zlib.decompress(text)
                except zlib.error:
                    pass
                found += leaks(head + b" " + text, f"{where}!{kind.decode()}")
            pos += 12 + n
    return found


def scan_tree(root: Path, skip: tuple[Path, ...] = ()) -> list[str]:
    out: list[str] = []
    for p in sorted(root.rglob("*")):
        if any(p == s or s in p.parents for s in skip):
            continue
        rel = str(p.relative_to(root))
        if any(n in rel.lower().encode() for n in NEEDLES):
            out.append(f"name:{rel}")
        if p.is_file():
            out += leaks(p.read_bytes(), rel)
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Every command run once on the marked export; (work root, source folder, captured output)."""
    from contextlib import redirect_stderr, redirect_stdout

    from medcl_cli.cli.app import main

    root = tmp_path_factory.mktemp("phi")
    src = write_phi_export(root / "export")
    captured: list[str] = []
    codes: dict[str, int] = {}

    def medcl(name: str, *args: str) -> None:
        o, e = io.StringIO(), io.StringIO()
        with redirect_stdout(o), redirect_stderr(e), pytest.raises(SystemExit) as exc:
            main(list(args))
        codes[name] = int(exc.value.code or 0)
        captured.append(f"$ {name}\n{o.getvalue()}\n{e.getvalue()}")

    ds, run = root / "ds", root / "run"
    medcl("ingest", "ingest", str(src), "--out", str(ds), "--label-series", MASK_DESCRIPTION, "--label-names",
          label_names_option(), "--meta", "PatientAge,PatientSex,SliceLocation", "--workers", "1")
    medcl("finetune", "finetune", "--data", str(ds), "--out", str(run), "--steps", "2", "--image-size", "32",
          "--device", "cpu", "--set", "model.channels=[4,8]", "--set", "train.val_every=2")
    medcl("evaluate", "evaluate", str(run), "--data", str(ds), "--split", "val", "--overlays", "--device", "cpu")
    patient = sorted(p for p in src.iterdir() if p.is_dir())[0]
    medcl("predict", "predict", str(run), str(patient), "--out", str(root / "preds"), "--device", "cpu")
    medcl("predict-seg", "predict", str(run), str(patient), "--out", str(root / "seg"), "--format", "dicom-seg",
          "--device", "cpu")
    medcl("export-nnunet", "export", str(ds), "--format", "nnunet", "--out", str(root / "nnunet"), "--copy")
    medcl("export-monai", "export", str(ds), "--format", "monai", "--out", str(root / "monai"))
    medcl("runs", "runs", str(root), "--json")
    return root, src, "\n".join(captured), codes


def test_every_command_ran(pipeline):
    _, _, text, codes = pipeline
    assert all(c == 0 for c in codes.values()), (codes, text[-3000:])


def test_no_phi_in_any_file_written(pipeline):
    root, src, _, _ = pipeline
    assert scan_tree(src)  # the marker really is in the inputs (the scanner can see it)
    assert scan_tree(root, skip=(src,)) == []


def test_no_phi_on_stdout_or_stderr(pipeline):
    _, _, text, _ = pipeline
    assert not any(n.decode() in text.lower() for n in NEEDLES), [ln for ln in text.splitlines() if MARK in ln][:5]


def test_allow_phi_only_under_private_and_never_copied_downstream(pipeline, tmp_path, capsys):
    root, src, _, _ = pipeline
    ds = tmp_path / "ds"
    code, out, err = V.run_cli(capsys, "ingest", str(src), "--out", str(ds), "--label-series", MASK_DESCRIPTION,
                               "--label-names", label_names_option(), "--meta", "PatientID,PatientAge",
                               "--allow-phi", "--workers", "1")
    assert code == 0, err
    found = scan_tree(ds)
    assert found and all(f.startswith("private") for f in found), found
    for fmt in ("nnunet", "monai"):
        code, out, err = V.run_cli(capsys, "export", str(ds), "--format", fmt, "--out", str(tmp_path / fmt))
        assert code == 0, err
        assert scan_tree(tmp_path / fmt) == []
    run = tmp_path / "run"
    code, out, err = V.run_cli(capsys, "finetune", "--data", str(ds), "--out", str(run), "--steps", "1",
                               "--image-size", "16", "--device", "cpu", "--set", "model.channels=[4,8]")
    assert code == 0, err
    assert scan_tree(run) == [] and MARK not in out + err
