"""Security: no code runs from a file medcl reads, and no value from a file decides where medcl writes.

- the package source never calls yaml.load/unsafe_load/full_load, pickle.load, eval/exec or torch.load without
  weights_only=True (grep of medcl_cli/ and benchmarks/);
- a checkpoint carrying a pickle payload (whose __reduce__ would create a marker file) is refused by every
  command that loads one, and the marker is never created; same for a YAML config with a python/object tag;
- names that come from headers, file names, zip members and hand-written CSVs (`../../evil`, absolute paths,
  unicode) never make medcl write outside its output folder.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest
import torch

import dicomgen as g
import volumes as V
from test_bad_inputs import all_paths, assert_clean

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "medcl_cli").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")])
MARKER = "MEDCL_PWNED_MARKER"


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Source lines without comments and docstring-only lines (a crude but conservative filter)."""
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        code = line.split("#", 1)[0]
        if code.strip() and not code.strip().startswith(('"', "'", "`")):
            out.append((i, code))
    return out


@pytest.mark.parametrize("pattern,why", [
    (r"\byaml\.(load|unsafe_load|full_load|load_all|unsafe_load_all)\s*\(", "YAML must go through yaml.safe_load"),
    (r"\bpickle\.loads?\s*\(|\bdill\.|\bcloudpickle\.", "unpickling runs code"),
    (r"(?<![\.\w])(eval|exec)\s*\(", "eval/exec of data"),
    (r"shell\s*=\s*True|\bos\.system\s*\(", "shell commands"),
    (r"\bnp\.load\s*\([^)]*allow_pickle\s*=\s*True", "numpy pickle loading"),
])
def test_package_never_calls_unsafe_loaders(pattern, why):
    bad = [f"{p.relative_to(REPO)}:{i}: {c.strip()}" for p in SOURCES for i, c in _code_lines(p) if re.search(pattern, c)]
    assert not bad, f"{why}: {bad}"


def test_every_torch_load_is_weights_only():
    calls = []
    for p in SOURCES:
        text = p.read_text(encoding="utf-8")
        for m in re.finditer(r"\btorch\.load\s*\(", text):
            depth, j = 0, m.end() - 1
            for j in range(m.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                if depth == 0:
                    break
            calls.append((p, text[m.start() : j + 1]))
    assert calls, "expected the checkpoint loader to call torch.load"
    bad = [f"{p.relative_to(REPO)}: {c}" for p, c in calls if not re.search(r"weights_only\s*=\s*True", c)]
    assert not bad, bad


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def evil_run(tmp_path):
    """A run folder whose best.pt holds a real state dict plus a pickle payload."""
    marker = tmp_path / MARKER
    state = {"format": 1, "method": "supervised", "stage": "finetune", "model": {"w": torch.zeros(2)},
             "label_map": {"0": "background", "1": "blob"}, "payload": _Evil(marker)}
    run = tmp_path / "evil_run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(state, run / "checkpoints" / "best.pt")
    torch.save(state, run / "checkpoints" / "last.pt")
    (run / "run.json").write_text('{"run_id": "evil_run", "command": "test"}')
    return run, marker


def test_pickle_payload_refused_by_every_command(evil_run, tmp_path, capsys, monkeypatch):
    run, marker = evil_run
    monkeypatch.chdir(tmp_path)
    data = V.write_dataset(tmp_path / "data", {"c0": "train", "c1": "val"})
    scan = str(data / "images" / "c1.nii.gz")
    for args in (["predict", str(run), scan, "--out", str(tmp_path / "p"), "--device", "cpu"],
                 ["predict", str(run / "checkpoints" / "best.pt"), scan, "--out", str(tmp_path / "p2")],
                 ["evaluate", str(run), "--data", str(data), "--split", "val", "--out", str(tmp_path / "e")],
                 ["finetune", "--data", str(data), "--init-from", str(run), "--out", str(tmp_path / "ft"),
                  "--steps", "1", "--image-size", "16", "--device", "cpu"],
                 ["pretrain", "--data", str(data), "--method", "simclr", "--init-from", str(run / "checkpoints" / "last.pt"),
                  "--out", str(tmp_path / "pt"), "--steps", "1", "--image-size", "16", "--device", "cpu"]):
        code, out, err = V.run_cli(capsys, *args)
        assert_clean(code, out, err, 4)
        assert "pickled Python object" in err
        assert not marker.exists()
    assert not marker.exists()


def test_yaml_with_python_tags_is_refused(tmp_path, capsys, tiny_dataset):
    marker = tmp_path / MARKER
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, out, err = V.run_cli(capsys, "finetune", "--data", str(tiny_dataset), "--config", str(cfg), "--out",
                               str(tmp_path / "run"), "--steps", "1")
    assert_clean(code, out, err, 2)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_header_and_file_names_never_write_outside_out(tmp_path, capsys):
    """SeriesDescription/PatientID '../..', a zip whose members climb out, unicode and spaces in file names."""
    src = tmp_path / "deep" / "in"
    g.write_series(src / "a", g.volume(4), description="../../../evil", phi={"PatientID": "../../../pwn"})
    g.write_series(src / "b", g.volume(4, seed=1), description="/etc/evil", phi={"PatientID": "/tmp/pwn"})
    members = g.write_series(tmp_path / "zsrc", g.volume(4, seed=2), description="..\\..\\evil")
    with zipfile.ZipFile(src / "climb.zip", "w") as zf:
        for i, p in enumerate(members):
            zf.write(p, f"../../../../evilzip/IM{i}")
    before = all_paths(tmp_path)
    out = tmp_path / "deep" / "ds"
    code, stdout, err = V.run_cli(capsys, "ingest", str(src), "--out", str(out), "--workers", "1")
    assert_clean(code, stdout, err, 0)
    preds = tmp_path / "deep" / "preds"
    run = V.write_run(tmp_path / "run")
    before |= all_paths(tmp_path / "run") | {str(tmp_path / "run")}
    code, stdout, err = V.run_cli(capsys, "predict", str(run), str(src), "--out", str(preds), "--device", "cpu")
    assert_clean(code, stdout, err, 0)
    new = all_paths(tmp_path) - before
    assert new and all(p == str(out) or p.startswith(str(out) + os.sep) or p == str(preds)
                       or p.startswith(str(preds) + os.sep) for p in new), sorted(new)
    names = [p.name for p in out.rglob("*")] + [p.name for p in preds.rglob("*")]
    assert not any("evil" in n or "pwn" in n for n in [p.name for p in out.rglob("*")]), names  # generated case ids
    # predict names a series after its description, reduced to letters, digits, '-' and '_': never a path
    assert all(re.fullmatch(r"series_[A-Za-z0-9_-]+\.(nii\.gz|json)", p.name) for p in preds.iterdir()), names
    assert not any("pwn" in n for n in names), names
    assert not Path("/tmp/pwn").exists() and not (tmp_path / "evilzip").exists()


def test_case_ids_from_csv_and_file_names_are_sanitised(tmp_path, capsys):
    """Case ids come from file names (NIfTI) and from --split-file/--meta-csv rows: never a path."""
    import SimpleITK as sitk

    src = tmp_path / "in"
    src.mkdir()
    img, _ = V.blob_volume((24, 24, 4), seed=1)
    for name in ("..nii.gz", "a b ünï.nii.gz", "-rf.nii.gz", "x;rm -rf.nii.gz"):
        sitk.WriteImage(V.oblique_image(img), str(src / name))
    split = tmp_path / "split.csv"
    split.write_text("case_id,split\n../../../etc/passwd,train\n")
    out = tmp_path / "ds"
    code, stdout, err = V.run_cli(capsys, "ingest", str(src), "--out", str(out), "--workers", "1",
                                  "--split-file", str(split))
    assert code in (0, 2, 4, 5), err
    assert_clean(code, stdout, err, (0, 2, 4, 5))
    for p in tmp_path.rglob("*"):
        assert p.resolve().is_relative_to(tmp_path.resolve())
    if out.exists():
        import csv

        with (out / "cases.csv").open(encoding="utf-8") as fh:
            ids = [r["case_id"] for r in csv.DictReader(fh)]
        assert ids and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", i) and ".." not in i for i in ids), ids
