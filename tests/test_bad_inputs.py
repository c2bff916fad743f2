"""The bad-input corpus: every command meets broken files beside good ones.

For each defect: the exit code of conventions.md 4.3 with `error:`/`hint:` lines and never a traceback, the
good inputs beside it still processed, nothing written outside `--out`, the input tree byte-identical after
the run (sha256 of every file). The corpus is generated here (tests/dicomgen.py for DICOM, SimpleITK and
nibabel for volumes, pydicom's own `dicomdirtests` for a DICOMDIR); ingest details already covered by
test_ingest*.py / test_dicom.py are not repeated.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medcl_cli.data.dicom.codecs import decoder_available
import dicomgen as g
import volumes as V

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------- helpers shared by the reliability tests
def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under root, by relative path."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link->" + os.readlink(p)
        elif p.is_file():
            try:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            except PermissionError:
                out[rel] = f"unreadable:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        elif p.is_dir():
            out[rel + "/"] = "dir"
    return out


def all_paths(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def assert_clean(code: int, out: str, err: str, expected: int | tuple[int, ...]) -> None:
    """Exit code as the conventions say; error:/hint: lines on failure; never a traceback or internal error."""
    allowed = expected if isinstance(expected, tuple) else (expected,)
    assert code in allowed, f"exit {code}, expected {allowed}\n{out}\n{err}"
    assert "Traceback" not in out + err and "internal error" not in err, err
    if code != 0:
        assert "error:" in err and "hint:" in err, err


def report_rows(dataset: Path) -> list[dict[str, str]]:
    with (dataset / "ingest_report.csv").open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- the DICOM corpus
DICOM_EXPECT = {  # folder (first path part under the corpus) -> statuses that must appear in its report rows
    "good series": {"ok"},
    "trunc": {"failed:truncated", "ignored:not-dicom", "failed:gap"},  # one file cut short + a zero-byte file
    "nogeo": {"failed:no-geometry"},
    "badiop": {"failed:geometry"},  # row and column cosines parallel
    "zerospacing": {"failed:geometry"},  # PixelSpacing 0
    "gaps": {"failed:gap"},
    "dups": {"failed:duplicates"},
    "mixed": {"ok"},  # MR and CT series of one study in one folder: two cases
    "jpeg": {"failed:codec"},  # failed:pixels once python-gdcm is installed: bogus data (set below)
    "dicomdir": {"ignored:dicomdir", "ok"},
    "unicode ünï 日本": {"ok"},  # SeriesDescription '../../evil'
    "evil2": {"ok"},  # PatientID '../../../pwn', SeriesDescription with backslashes
    "notes.txt": {"ignored:not-dicom"},
    "broken link.dcm": {"failed:unreadable"},
}


def build_dicom_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    g.write_series(root / "good series", g.volume(5), description="good")
    t = g.write_series(root / "trunc", g.volume(8), description="trunc")
    t[3].write_bytes(t[3].read_bytes()[:-200])
    (root / "trunc" / "zero.dcm").write_bytes(b"")
    for p in g.write_series(root / "nogeo", g.volume(4), description="nogeo"):
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient
        ds.save_as(p)
    g.write_series(root / "badiop", g.volume(4), description="badiop", iop=(1, 0, 0, 1, 0, 0))
    g.write_series(root / "zerospacing", g.volume(4), description="zsp", spacing=(0.0, 0.0))
    g.write_series(root / "gaps", g.volume(6), positions=[0, 2, 4, 10, 12, 14], description="gaps")
    g.write_series(root / "dups", g.volume(5), positions=[0, 2, 2, 4, 6], description="dups")
    study = pydicom.uid.generate_uid()
    g.write_series(root / "mixed", g.volume(4), description="mr", study=study)
    g.write_series(root / "mixed", g.volume(4, seed=1), description="ct", modality="CT", sop_class=g.CT, study=study,
                   names=[f"ct{k}" for k in range(4)])
    g.write_jpeg_series(root / "jpeg")
    shutil.copytree(Path(pydicom.data.get_testdata_file("DICOMDIR")).parent, root / "dicomdir")
    (root / "empty").mkdir()
    g.write_series(root / "unicode ünï 日本", g.volume(4), description="../../evil")
    g.write_series(root / "evil2", g.volume(4), description="..\\..\\evil/../x", phi={"PatientID": "../../../pwn"})
    (root / "notes.txt").write_text("not an image")
    os.symlink(root / "missing-target.dcm", root / "broken link.dcm")
    return root


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    """The corpus ingested once; (corpus, dataset, exit code, stdout, stderr, digest before, paths before)."""
    base = tmp_path_factory.mktemp("dicomcorpus")
    corpus = build_dicom_corpus(base / "in")
    before, paths = tree_digest(corpus), all_paths(base)
    import contextlib
    import io

    from medcl_cli.cli.app import main

    out = base / "ds"
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e), pytest.raises(SystemExit) as exc:
        main(["ingest", str(corpus), "--out", str(out), "--workers", "1"])
    return corpus, out, int(exc.value.code or 0), o.getvalue(), e.getvalue(), before, paths, base


def test_dicom_corpus_exit_and_untouched_inputs(dicom_run):
    corpus, out, code, stdout, err, before, paths, base = dicom_run
    assert_clean(code, stdout, err, 5)  # partial success: the good series are cases, the rest reported
    assert tree_digest(corpus) == before
    assert all_paths(base) - paths <= all_paths(out) | {str(out)}  # nothing written beside --out
    assert not list(out.rglob(".tmp-*"))
    assert "RuntimeWarning" not in err  # degenerate geometry is reported, not divided by zero


@pytest.mark.parametrize("item", sorted(DICOM_EXPECT))
def test_dicom_corpus_item(dicom_run, item):
    corpus, out, *_ = dicom_run
    rows = [r for r in report_rows(out) if r["source"].split("/")[1:2] == [item]
            or (item == "broken link.dcm" and "missing-target" in r["source"])]
    assert rows, f"no report row for {item}"
    statuses = {r["status"] for r in rows}
    expect = DICOM_EXPECT[item]
    if item == "jpeg" and decoder_available("1.2.840.10008.1.2.4.50"):
        expect = {"failed:pixels"}
    assert expect <= statuses, (item, statuses)
    for r in rows:
        assert "\n" not in r["reason"] and "Traceback" not in r["reason"]
        if r["status"].startswith("failed:"):
            assert r["reason"], r
    if item == "jpeg":
        assert "pip install" in rows[0]["reason"] or "cannot be decoded by python-gdcm" in rows[0]["reason"]
    if item == "mixed":
        assert {r["modality"] for r in rows if r["status"] == "ok"} == {"MR", "CT"}


def test_dicom_corpus_names_stay_inside(dicom_run):
    """Tag-derived text ('../../evil', '../../../pwn') never becomes a path: case ids are generated."""
    _, out, *_ = dicom_run
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())
        assert "evil" not in p.name and "pwn" not in p.name
    ids = [r["case_id"] for r in report_rows(out) if r["case_id"]]
    assert ids and all(i.replace("_", "").isalnum() for i in ids)


def test_empty_folder_and_only_junk(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = V.run_cli(capsys, "ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "ds"))
    assert_clean(code, out, err, 3)
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["ingest_report.csv"]  # written on every exit
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(b"")
    (tmp_path / "junk" / "b.txt").write_text("x")
    code, out, err = V.run_cli(capsys, "ingest", str(tmp_path / "junk"), "--out", str(tmp_path / "ds"))
    assert_clean(code, out, err, 3)
    code, out, err = V.run_cli(capsys, "ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "ds"))
    assert_clean(code, out, err, (2, 3))


def test_unreadable_file_permissions(tmp_path, capsys):
    if RUNNING_AS_ROOT:
        pytest.skip("running as root: chmod 000 does not deny reads (the broken-link case covers unreadable paths)")
    src = tmp_path / "in"
    g.write_series(src / "good", g.volume(4))
    locked = g.write_series(src / "locked", g.volume(4))
    for p in locked:
        p.chmod(0)
    try:
        code, out, err = V.run_cli(capsys, "ingest", str(src), "--out", str(tmp_path / "ds"), "--workers", "1")
        assert_clean(code, out, err, 5)
        assert "failed:unreadable" in {r["status"] for r in report_rows(tmp_path / "ds")}
    finally:
        for p in locked:
            p.chmod(0o644)


# ---------------------------------------------------------------- the volume corpus (NIfTI) for ingest and predict
VOLUME_EXPECT = {  # file -> (ingest status, predict written?)
    "good.nii.gz": ("ok", True),
    "two_d.nii.gz": ("ok", True),  # one slice: a 1-slice volume
    "vector.nii.gz": ("failed:unreadable", False),  # 32 components per voxel
    "four_d.nii.gz": ("failed:4d", False),  # readable, but 4D: ingest needs --frames
    "nan vox.nii.gz": ("ok", True),  # NaN/inf replaced by the minimum, by ingest and predict (ITK reads them as 0)
    "trunc.nii.gz": ("failed:unreadable", False),  # ITK would zero-fill the missing voxels
    "zero.nii.gz": ("failed:unreadable", False),
    "ünï cöde.nii.gz": ("ok", True),
    "badlab.nii.gz": ("ok", True),  # label value 7 beyond --label-names: becomes class_7 in dataset.json
    "grid.nii.gz": ("failed:label-grid", True),  # label on another size
    "sp.nii.gz": ("failed:label-grid", True),  # label on another spacing
}


def build_volume_corpus(root: Path) -> tuple[Path, Path]:
    imgs, labs = root / "imgs", root / "labs"
    imgs.mkdir(parents=True)
    labs.mkdir()
    rng = np.random.default_rng(0)

    def w(arr: np.ndarray, path: Path, spacing: tuple[float, ...] | None = None) -> None:
        im = sitk.GetImageFromArray(arr)
        if spacing:
            im.SetSpacing(spacing)
        sitk.WriteImage(im, str(path))

    a = (rng.normal(size=(6, 32, 32)) * 50 + 200).astype(np.float32)
    lab = (a > 250).astype(np.uint8)
    w(a, imgs / "good.nii.gz")
    w(lab, labs / "good.nii.gz")
    w(a[0], imgs / "two_d.nii.gz")
    w(rng.normal(size=(3, 6, 32, 32)).astype(np.float32), imgs / "vector.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((16, 16, 5, 3)).astype(np.float32), np.eye(4)), str(imgs / "four_d.nii.gz"))
    b = a.copy()
    b[0, 0, 0], b[1, 1, 1] = np.nan, np.inf
    w(b, imgs / "nan vox.nii.gz")
    data = (imgs / "good.nii.gz").read_bytes()
    (imgs / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    (imgs / "zero.nii.gz").write_bytes(b"")
    (imgs / "ünï cöde.nii.gz").write_bytes(data)
    w(a, imgs / "badlab.nii.gz")
    w((lab * 7).astype(np.uint8), labs / "badlab.nii.gz")
    w(a, imgs / "grid.nii.gz")
    w(lab[:, :16], labs / "grid.nii.gz")
    w(a, imgs / "sp.nii.gz")
    w(lab, labs / "sp.nii.gz", spacing=(2.0, 1.0, 1.0))
    return imgs, labs


@pytest.fixture(scope="module")
def volume_corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("volcorpus")
    imgs, labs = build_volume_corpus(base / "in")
    return base, imgs, labs


def test_volume_corpus_ingest(volume_corpus, capsys):
    base, imgs, labs = volume_corpus
    before, paths = tree_digest(base / "in"), all_paths(base)
    out = base / "ds"
    code, stdout, err = V.run_cli(capsys, "ingest", str(imgs), "--labels", str(labs), "--label-names", "1=fg",
                                  "--out", str(out), "--workers", "1")
    assert_clean(code, stdout, err, 5)
    assert tree_digest(base / "in") == before
    assert all_paths(base) - paths <= all_paths(out) | {str(out)}
    status = {r["source"].split("/")[-1]: r for r in report_rows(out)}
    for name, (want, _) in VOLUME_EXPECT.items():
        assert status[name]["status"] == want, (name, status[name])
    assert status["nan vox.nii.gz"]["reason"] == "replaced 1 NaN and 1 inf voxels by the minimum 5.02891"
    assert "truncated" in status["trunc.nii.gz"]["reason"]
    assert "4D volume (16 x 16 x 5 x 3" in status["four_d.nii.gz"]["reason"] and "--frames" in status["four_d.nii.gz"]["reason"]
    assert "components" in status["vector.nii.gz"]["reason"]
    # what went in is exactly what was given (no NaN zeroed, no zero-filled tail)
    good = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / "good.nii.gz")))
    np.testing.assert_array_equal(good, sitk.GetArrayFromImage(sitk.ReadImage(str(imgs / "good.nii.gz"))))
    code, stdout, err = V.run_cli(capsys, "validate", str(out))
    assert_clean(code, stdout, err, 0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder whose network is barely trained (predict mechanics only, not quality)."""
    return V.write_run(tmp_path_factory.mktemp("badrun") / "run", V.trained_blob_state(steps=80))


def test_predict_on_bad_volumes(volume_corpus, tiny_run, capsys, tmp_path):
    base, imgs, _ = volume_corpus
    before = tree_digest(imgs)
    out = tmp_path / "preds"
    code, stdout, err = V.run_cli(capsys, "predict", str(tiny_run), str(imgs), "--out", str(out), "--device", "cpu")
    assert_clean(code, stdout, err, 5)
    assert tree_digest(imgs) == before
    for name, (_, written) in VOLUME_EXPECT.items():
        stem = name[: -len(".nii.gz")]
        assert (out / f"{stem}.nii.gz").exists() == written, name
        if not written:
            assert name in err  # each failed input is named on stderr
    assert {p.parent for p in tmp_path.rglob("*") if p.is_file()} == {out}
    # re-running completes nothing new and fails the same inputs
    code, stdout, err = V.run_cli(capsys, "predict", str(tiny_run), str(imgs), "--out", str(out), "--device", "cpu")
    assert_clean(code, stdout, err, 5)
    assert "0 written" in stdout


def test_predict_on_dicom_corpus(dicom_run, tiny_run, capsys, tmp_path):
    corpus, *_ , before, _, _ = dicom_run
    out = tmp_path / "preds"
    code, stdout, err = V.run_cli(capsys, "predict", str(tiny_run), str(corpus), "--out", str(out), "--device", "cpu")
    assert_clean(code, stdout, err, 5)
    assert tree_digest(corpus) == before
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(written) >= 5  # good series, mixed MR + CT, two evil-named series, DICOMDIR images
    assert all(p.resolve().parent == out.resolve() for p in tmp_path.rglob("*") if p.is_file())
    # a description becomes at most a sanitised part of the name ('../../evil' -> series_0003_evil): never a path
    assert all(re.fullmatch(r"series_[A-Za-z0-9_-]+\.nii\.gz", n) for n in written), written
    assert not any("pwn" in n for n in written)  # PatientID is no part of a name


# ---------------------------------------------------------------- hand-edited datasets: validate, finetune, evaluate
def _edit_cases(root: Path, fn) -> None:
    lines = (root / "cases.csv").read_text(encoding="utf-8").splitlines()
    (root / "cases.csv").write_text("\n".join(fn(lines)) + "\n", encoding="utf-8")


def _set(lines: list[str], row: int, col: str, value: str) -> list[str]:
    header = lines[0].split(",")
    cells = lines[row].split(",")
    cells[header.index(col)] = value
    lines[row] = ",".join(cells)
    return lines


EDITS = {  # name -> (edit, exit code of validate, text in the message)
    "bad split": (lambda ls: _set(ls, 1, "split", "Train "), 4, "is not one of"),
    "duplicate row": (lambda ls: ls + [ls[2]], 4, "more than once"),
    "size not a number": (lambda ls: _set(ls, 2, "size_z", "abc"), 4, "not a number"),
    "wrong size": (lambda ls: _set(ls, 2, "size_x", "999"), 4, "in the image"),
    "path escapes": (lambda ls: _set(ls, 1, "image", "../../../etc/passwd"), 4, "outside the dataset"),
    "absolute path": (lambda ls: _set(ls, 1, "label", "/etc/passwd"), 4, "outside the dataset"),
    "missing file": (lambda ls: _set(ls, 1, "image", "images/nope.nii.gz"), 4, "file missing"),
    "empty case id": (lambda ls: _set(ls, 1, "case_id", ""), 4, "empty case_id"),
    "missing column": (lambda ls: [",".join(c for c in row.split(",")[:4]) for row in ls], 4, "lacks the column"),
    "not csv": (lambda ls: ['"unterminated', "\x00\x01"], 4, "cannot parse"),
}


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
    return V.write_dataset(tmp_path_factory.mktemp("edits") / "data",
                           {"c0": "train", "c1": "train", "c2": "val", "c3": "test"})


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_hand_edited_cases_csv(clean_dataset, edit, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(clean_dataset, data)
    fn, want, text = EDITS[edit]
    _edit_cases(data, fn)
    code, out, err = V.run_cli(capsys, "validate", str(data))
    assert_clean(code, out, err, want)
    assert text in out + err


@pytest.mark.parametrize("defect", ["label on another grid", "label value not in the map", "path escapes",
                                    "image missing", "NaN voxels"])
def test_finetune_refuses_a_broken_dataset(clean_dataset, defect, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(clean_dataset, data)
    monkeypatch.setenv("MEDCL_CACHE_DIR", str(tmp_path / "cache"))  # so the dataset tree must stay byte-identical
    if defect == "label on another grid":
        sitk.WriteImage(sitk.Image(8, 8, 3, sitk.sitkUInt8), str(data / "labels" / "c1.nii.gz"))
    elif defect == "label value not in the map":
        lab = sitk.ReadImage(str(data / "labels" / "c1.nii.gz"))
        arr = sitk.GetArrayFromImage(lab)
        arr[0, 0, 0] = 9
        new = sitk.GetImageFromArray(arr)
        new.CopyInformation(lab)
        sitk.WriteImage(new, str(data / "labels" / "c1.nii.gz"))
    elif defect == "path escapes":
        _edit_cases(data, lambda ls: _set(ls, 1, "image", "../../outside.nii.gz"))
    elif defect == "image missing":
        (data / "images" / "c1.nii.gz").unlink()
    else:
        img = nib.load(str(data / "images" / "c0.nii.gz"))
        arr = np.asarray(img.dataobj).astype(np.float32)
        arr[2, 2, 2] = np.nan
        nib.save(nib.Nifti1Image(arr, img.affine), str(data / "images" / "c0.nii.gz"))
    before = tree_digest(data)
    run = tmp_path / "run"
    code, out, err = V.run_cli(capsys, "finetune", "--data", str(data), "--out", str(run), "--steps", "1",
                               "--image-size", "16", "--device", "cpu", "--set", "model.channels=[4,8]")
    assert_clean(code, out, err, (3, 4))
    assert tree_digest(data) == before
    assert not (run / "checkpoints" / "last.pt").exists()


def test_evaluate_on_a_broken_dataset(clean_dataset, tiny_run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(clean_dataset, data)
    _edit_cases(data, lambda ls: _set(ls, 3, "split", "val"))
    sitk.WriteImage(sitk.Image(8, 8, 3, sitk.sitkUInt8), str(data / "labels" / "c2.nii.gz"))  # another grid
    before = tree_digest(data)
    out = tmp_path / "ev"
    code, stdout, err = V.run_cli(capsys, "evaluate", str(tiny_run), "--data", str(data), "--split", "val",
                                  "--out", str(out), "--device", "cpu")
    assert_clean(code, stdout, err, (4, 5))
    assert "c2" in err
    assert tree_digest(data) == before
