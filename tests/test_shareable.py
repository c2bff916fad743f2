"""Outputs a team can share: every file and folder medcl writes follows the user's umask (the atomic temporary
files included), and no working file (`.pid`, `.tmp-*`) is left in a finished folder.

`tempfile.mkstemp`/`mkdtemp` create 0600/0700 whatever the umask; before core/files.py's `shareable`, every
atomic write (cases.csv, dataset.json, checkpoints, predictions, report.html, curves.png) came out
`-rw-------` under `umask 022`, and the nnU-Net export and `demo/dicom` folders `drwx------`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import volumes as V

from medcl_cli.core.files import atomic_path, current_umask, make_tempdir

TINY = ["--steps", "2", "--image-size", "32", "--batch-size", "4", "--device", "cpu",
        "--set", "model.channels=[4,8,16]", "--set", "train.val_every=2"]


@pytest.fixture
def umask():
    """Run the test body under a given umask, restoring the old one afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _modes(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        out[str(p.relative_to(root.parent))] = ("d" if stat.S_ISDIR(st.st_mode) else "f", stat.S_IMODE(st.st_mode))
    return out


def _assert_modes(roots: list[Path], mask: int) -> int:
    """Every file is 0o666 & ~mask, every folder 0o777 & ~mask; no working file anywhere. Returns the count."""
    want = {"f": 0o666 & ~mask, "d": 0o777 & ~mask}
    n = 0
    for root in roots:
        modes = _modes(root)
        bad = {k: oct(m) for k, (kind, m) in modes.items() if m != want[kind]}
        assert not bad, f"not {oct(want['f'])}/{oct(want['d'])} under umask {oct(mask)}: {sorted(bad.items())[:8]}"
        working = [k for k in modes if Path(k).name == ".pid" or Path(k).name.startswith((".tmp-", ".old-"))
                   or ".tmp-" in Path(k).name]
        assert not working, working
        n += len(modes)
    return n


def test_umask_is_read_without_changing_it(umask):
    umask(0o027)
    assert current_umask() == 0o027 and current_umask() == 0o027  # reading twice: still the same umask
    assert os.umask(0o027) == 0o027


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_atomic_files_and_temporary_folders_follow_the_umask(umask, tmp_path, mask):
    umask(mask)
    with atomic_path(tmp_path / "a.txt", ".txt") as tmp:
        assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600  # what mkstemp gives, until the rename
        Path(tmp).write_text("x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
    d = make_tempdir(".tmp-x-", tmp_path)
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=oct)
def test_real_chain_outputs_follow_the_umask(umask, shared_data, tmp_path, capsys, mask):
    """ingest (TCIA DICOM) -> finetune -> evaluate --report -> predict (DICOM) -> export nnunet, and the demo
    writer: under umask 022 a colleague can read everything (0644/0755); under 077 it all stays private."""
    from medcl_cli.demo.chain import SIZES, prepare

    umask(mask)
    src = shared_data("tcia_brain_tumor_progression_dicom")
    ds, run, ev, preds, nn = (tmp_path / n for n in ("ds", "run", "ev", "preds", "nn"))
    code, _, err = V.run_cli(capsys, "ingest", str(src / "PGBM-003"), str(src / "PGBM-008"), "--out", str(ds),
                             "--label-series", "Mask", "--val-fraction", "0.5")
    assert code == 0, err
    code, _, err = V.run_cli(capsys, "finetune", "--data", str(ds), "--out", str(run), *TINY)
    assert code == 0, err
    code, _, err = V.run_cli(capsys, "evaluate", str(run), "--data", str(ds), "--split", "val", "--report",
                             "--out", str(ev))
    assert code == 0, err
    series = next((src / "PGBM-003").glob("*/11-T1post-*"))
    code, _, err = V.run_cli(capsys, "predict", str(run), str(series), "--out", str(preds))
    assert code == 0, err
    code, _, err = V.run_cli(capsys, "export", str(ds), "--format", "nnunet", "--out", str(nn), "--copy")
    assert code == 0, err
    prepare(tmp_path / "demo", SIZES["small"])
    roots = [ds, run, ev, preds, nn, tmp_path / "demo"]
    n = _assert_modes(roots, mask)
    assert n > 60
    for name in ("cases.csv", "dataset.json", "meta.csv", "ingest_report.csv"):
        assert (ds / name).is_file()
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "curves.png").is_file()
    assert (ev / "report.html").is_file() and list(preds.glob("series_*.nii.gz"))
    assert (tmp_path / "demo" / "dicom").is_dir() and any(nn.rglob("dataset.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "ds", "ev", "nn", "preds", "run"]  # no work folder


def test_ingest_leaves_no_pid_file_on_success_or_failure(tmp_path, capsys):
    """The ingest work folder carries its owner's pid in its name: no `.pid` file reaches the dataset, and a
    failed ingest removes its work folder."""
    import dicomgen as g

    src = tmp_path / "src"
    g.write_series(src / "s0", g.volume(3, 16, 16, seed=1), description="T1")
    code, _, err = V.run_cli(capsys, "ingest", str(src), "--out", str(tmp_path / "ds"))
    assert code == 0, err
    assert not (tmp_path / "ds" / ".pid").exists() and not [p for p in (tmp_path / "ds").rglob(".*")]
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "ds2"))
    assert code == 3
    (tmp_path / "empty").mkdir()
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "ds3"))
    assert code == 3, err
    # no work folder, lock or .pid beside or inside: the failed ingest leaves only its report in --out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds3", "empty", "src"]
    assert [p.name for p in (tmp_path / "ds3").iterdir()] == ["ingest_report.csv"]


def test_private_phi_folder_stays_owner_only_under_a_shared_umask(umask, tmp_path, capsys):
    """`--allow-phi` puts PatientID etc. in DATASET/private/: 0700 / 0600 even when the rest is 0755 / 0644."""
    import dicomgen as g

    umask(0o022)
    g.write_series(tmp_path / "src" / "s0", g.volume(3, 16, 16, seed=1), description="T1")
    code, _, err = V.run_cli(capsys, "ingest", str(tmp_path / "src"), "--out", str(tmp_path / "ds"), "--allow-phi",
                             "--meta", "PatientID")
    assert code == 0, err
    private = tmp_path / "ds" / "private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in private.iterdir()} == {"id_map.csv": 0o600, "meta_phi.csv": 0o600}
    assert stat.S_IMODE((tmp_path / "ds" / "cases.csv").stat().st_mode) == 0o644
