"""Outputs that cannot be lost or poisoned (issue 19's attack run), one test per finding.

Two ingests into one --out, an --out inside the input, an --out where no temporary folder can be made, a
zip bomb, formula cells in CSVs, and the reason of the only failing input.
"""

from __future__ import annotations

import csv
import os
import resource
import shutil
import time
import zipfile
from pathlib import Path

import dicomgen as g
import numpy as np
import pytest
import volumes as V

from medcl_cli.core.files import safe_cell, write_rows_atomic
from medcl_cli.core.lock import lock_path, output_lock
from medcl_cli.data.dicom.codecs import decoder_available
from medcl_cli.data.ingest_output import check_output, swap_into_place
from medcl_cli.errors import OutputError


def _cases(out: Path) -> list[dict[str, str]]:
    with open(out / "cases.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_second_writer_is_refused_and_no_lock_is_left(tmp_path, capsys):
    g.write_series(tmp_path / "in" / "s1", g.volume(3))
    out = tmp_path / "ds"
    with output_lock(out.resolve()):  # a first ingest holding --out (this live process)
        code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "in"), "--out", str(out))
        assert code == 6, err
        assert "being written by process" in err and "lock" in err
        assert not out.exists()
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "in"), "--out", str(out), "--workers", "1")
    assert code == 0, err
    assert not lock_path(out).exists() and not any(p.name.endswith(".lock") for p in out.rglob("*"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # a lock left by a killed process (its pid is gone) is taken over
    lock_path(out).write_text("999999999")
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "in"), "--out", str(out), "--overwrite", "--workers", "1")
    assert code == 0, err
    assert not lock_path(out).exists()


def test_two_ingests_at_once_the_second_exits_6_and_the_first_result_stays(tmp_path, capsys):
    """The race itself: a real `medcl ingest` subprocess holds --out while a second one starts."""
    import subprocess
    import sys

    src = tmp_path / "in"
    n = 24
    for i in range(n):
        g.write_series(src / f"s{i:02d}", g.volume(10, 64, 64, seed=i))
    out = tmp_path / "ds"
    code, _, err = V.run_cli(capsys, "ingest", str(src / "s00"), "--out", str(tmp_path / "warm"), "--workers", "1")
    assert code == 0, err  # the second ingest's imports are done: it reaches the lock within milliseconds
    shutil.rmtree(tmp_path / "warm")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    first = subprocess.Popen([sys.executable, "-m", "medcl_cli", "ingest", str(src), "--out", str(out),
                              "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not lock_path(out).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        code, _, err = V.run_cli(capsys, "ingest", str(src), "--out", str(out), "--workers", "1")
    finally:
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert code == 6, err  # refused by the lock (or, had the first finished already, by the non-empty --out)
    assert "being written by process" in err or "exists and is not empty" in err
    assert len(_cases(out)) == n and not lock_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in"]


def test_swap_never_deletes_a_result_it_did_not_create(tmp_path):
    out = tmp_path / "ds"
    state = check_output(out, overwrite=False)  # absent at the start
    work = tmp_path / ".ds.tmp-x"
    (work / "images").mkdir(parents=True)
    out.mkdir()
    (out / "cases.csv").write_text("someone else's result")  # another writer finished meanwhile
    with pytest.raises(OutputError, match="created or replaced by someone else"):
        swap_into_place(work, out, state)
    assert (out / "cases.csv").read_text() == "someone else's result"


def test_out_inside_the_input_is_not_read_back(tmp_path, capsys):
    src = tmp_path / "in"
    g.write_series(src / "s1", g.volume(3))
    g.write_series(src / "s2", g.volume(4))
    code, _, err = V.run_cli(capsys, "ingest", str(src), "--out", str(src / "ds1"), "--workers", "1")
    assert code == 0, err
    assert len(_cases(src / "ds1")) == 2
    code, _, err = V.run_cli(capsys, "ingest", str(src), "--out", str(src / "ds2"), "--workers", "1")
    assert code == 0, err
    assert len(_cases(src / "ds2")) == 2  # not 2 DICOM + 2 NIfTI of ds1
    assert "skipped" in err and "earlier medcl dataset" in err
    report = (src / "ds2" / "ingest_report.csv").read_text()
    assert "ignored:medcl-output" in report and "in/ds1" in report


def test_out_where_no_temporary_folder_can_be_made(tmp_path, capsys):
    g.write_series(tmp_path / "in", g.volume(3))
    for out in ("/proc/medcl-test-ds", "/proc/medcl-missing/ds"):
        code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "in"), "--out", out)
        assert code == 6, err
        assert "internal error" not in err and "Traceback" not in err and "hint:" in err


def _dicom_header_bytes(rows: int, cols: int) -> bytes:
    """A DICOM header declaring rows x cols int16 pixels, up to and including the PixelData element header."""
    import io

    ds = g._base(g.MR, "1.2.3", "1.2.3.4", None, "MR")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelSpacing, ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 1], [1, 0, 0, 0, 1, 0], [0, 0, 0]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    n = rows * cols * 2
    return buf.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + n.to_bytes(4, "little")


def test_zip_bomb_is_refused_quickly_with_bounded_memory(tmp_path, capsys):
    bomb = tmp_path / "bomb.zip"
    zeros = bytes(64 << 20)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k in range(2):  # two 16384 x 16384 int16 images of zeros: 512 MiB each, a few MB packed
            with zf.open(f"IM{k}.dcm", "w", force_zip64=True) as fh:
                fh.write(_dicom_header_bytes(16384, 16384))
                for _ in range(8):
                    fh.write(zeros)
    del zeros
    assert bomb.stat().st_size < 8 << 20
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    code, _, err = V.run_cli(capsys, "ingest", str(bomb), "--out", str(tmp_path / "ds"))
    elapsed = time.perf_counter() - t0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert code == 3, err
    assert "zip bomb" in err and "over the 200x limit" in err
    assert elapsed < 5 and grown_mib < 200, (elapsed, grown_mib)
    report = (tmp_path / "ds" / "ingest_report.csv").read_text()
    assert report.count("failed:zip-limit") == 2


@pytest.mark.parametrize("raw,safe", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1+2", "'+1+2"), ("-cmd|' /c calc'!A0", "'-cmd|' /c calc'!A0"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\t=1", "' =1"), ("a\x00b\x1bc", "abc"), ("line\nbreak", "line break"),
    ("-3.5", "-3.5"), ("+2", "+2"), ("-1e-3\\2.5\\-4", "-1e-3\\2.5\\-4"), ("T1 axial", "T1 axial"), (-3.5, -3.5),
])
def test_formula_cells_are_neutralised(raw, safe):
    assert safe_cell(raw) == safe


def test_every_csv_writer_neutralises(tmp_path, capsys):
    import pandas as pd

    from medcl_cli.core.files import write_csv_atomic

    write_rows_atomic([{"a": "=1+1", "b": -3.5}], ["a", "b"], tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b", "'=1+1,-3.5"]
    write_csv_atomic(pd.DataFrame({"=x": ["@cmd", "ok"], "v": [-1.5, 2.0]}), tmp_path / "d.csv")
    assert (tmp_path / "d.csv").read_text().splitlines() == ["'=x,v", "'@cmd,-1.5", "ok,2.0"]
    # through ingest: series descriptions that a spreadsheet would run
    g.write_series(tmp_path / "in" / "s1", g.volume(3), description="=cmd|' /c calc'!A0")
    g.write_series(tmp_path / "in" / "gap", g.volume(4), positions=[0, 2, 4, 10], description="+evil")
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "in"), "--out", str(tmp_path / "ds"), "--workers", "1")
    assert code == 5, err
    for name in ("ingest_report.csv", "cases.csv", "meta.csv"):
        with open(tmp_path / "ds" / name, newline="") as fh:
            cells = [c for row in csv.reader(fh) for c in row]
        assert not [c for c in cells if c and (c[0] in "=+@" or (c[0] == "-" and not _number(c)))], name
    assert "'=cmd" in (tmp_path / "ds" / "ingest_report.csv").read_text()


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_the_only_failing_input_names_its_reason_and_the_report_is_written(tmp_path, capsys):
    import SimpleITK as sitk

    cine = tmp_path / "cine_4d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 16, 16), np.float32), isVector=False), str(cine))  # 16 x 16 x 4 x 3
    code, _, err = V.run_cli(capsys, "ingest", str(cine), "--out", str(tmp_path / "o1"))
    assert code == 4, err  # readable, but 4D: invalid data, with the option that takes it
    assert "4D volume (16 x 16 x 4 x 3: 3 frames of 16 x 16 x 4)" in err and "hint: run ingest again with --frames split" in err
    assert "failed:4d" in (tmp_path / "o1" / "ingest_report.csv").read_text()

    import nibabel as nib

    skew = np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # a shear: not a rotation
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), skew), str(tmp_path / "skew.nii.gz"))
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "skew.nii.gz"), "--out", str(tmp_path / "o5"))
    assert code == 3, err
    assert "not orthonormal" in err and "hint: the image orientation is not a rotation" in err
    assert str(tmp_path) not in (tmp_path / "o5" / "ingest_report.csv").read_text()  # no absolute path in the reason

    g.write_jpeg_series(tmp_path / "jpeg", 2)
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "jpeg"), "--out", str(tmp_path / "o2"))
    assert code == 3, err
    assert "1.2.840.10008.1.2.4.50" in err and "decode" in err
    if decoder_available("1.2.840.10008.1.2.4.50"):  # python-gdcm (a dependency) installed: the data are bogus
        assert "cannot be decoded by python-gdcm" in err and "hint: the compressed pixel data are damaged" in err
    else:
        assert "pip install python-gdcm" in err

    files = g.write_series(tmp_path / "nopix", g.volume(1))
    import pydicom

    ds = pydicom.dcmread(files[0])
    del ds.PixelData
    ds.save_as(files[0])
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "nopix"), "--out", str(tmp_path / "o3"))
    assert code == 3, err
    assert "no PixelData element" in err and "holds no pixel data" in err
    assert (tmp_path / "o3" / "ingest_report.csv").is_file()
    # an earlier dataset at --out (with --overwrite) is never mixed with the failure report
    g.write_series(tmp_path / "good", g.volume(3))
    assert V.run_cli(capsys, "ingest", str(tmp_path / "good"), "--out", str(tmp_path / "o4"), "--workers", "1")[0] == 0
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "nopix"), "--out", str(tmp_path / "o4"), "--overwrite")
    assert code == 3 and (tmp_path / "o4" / "cases.csv").is_file()
    assert (tmp_path / "o4.ingest_report.csv").is_file()
    assert os.path.getsize(tmp_path / "o4" / "ingest_report.csv") > 0
