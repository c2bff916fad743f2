"""Faults: kill -9 in the middle of ingest, pretrain, finetune and predict (real subprocesses of the CLI), then
run again; a full disk (a 2 MB tmpfs when mount is allowed, else ENOSPC simulated in-process); out of memory
(simulated in the forward pass); an output that cannot be written; damaged checkpoints given to every command.

What must hold: ingest leaves no half dataset and the next run completes; training resumes from last.pt and
ends bit-identical to an uninterrupted deterministic run; predict completes the missing cases only; resource
exhaustion exits 7 and an unwritable output 6, each with a hint and no traceback.
"""

from __future__ import annotations

from collections.abc import Callable

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

import dicomgen as g
import volumes as V
from test_bad_inputs import all_paths, assert_clean, tree_digest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def kill9_when(args: list[str], pattern: str = "", path: Path | None = None, timeout: float = 240.0,
               ready: Callable[[], bool] | None = None) -> list[str]:
    """Start `medcl ARGS` and send SIGKILL as soon as a stderr line matches `pattern`, `path` exists or
    `ready()` is true (polled every few ms, for phases that print nothing); returns the stderr lines read."""
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "medcl_cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ((pattern and any(re.search(pattern, ln) for ln in list(lines))) or (path is not None and path.exists())
                    or (ready is not None and ready())):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.003)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=5)
    assert proc.returncode == -signal.SIGKILL, f"not killed (exit {proc.returncode}):\n{''.join(lines)}"
    return lines


def medcl(capsys, *args: str) -> tuple[int, str, str]:
    return V.run_cli(capsys, *args)


# ---------------------------------------------------------------- kill -9
def test_kill9_ingest_leaves_no_half_dataset(tmp_path, capsys):
    src = tmp_path / "in"
    n = 24
    for i in range(n):
        g.write_series(src / f"s{i:02d}", g.volume(6, 24, 24, seed=i), description=f"series {i}")
    before = tree_digest(src)
    out = tmp_path / "ds"
    # killed once the first volume sits in the work folder: mid-conversion, whatever the machine's speed
    # (a progress line is printed only every few seconds off a terminal, so it cannot be the trigger)
    kill9_when(["ingest", str(src), "--out", str(out), "--workers", "1"],
               ready=lambda: any(tmp_path.glob(".ds.tmp-*/images/*.nii.gz")))
    assert not out.exists()  # the dataset appears only when complete (built aside, renamed into place)
    assert tree_digest(src) == before
    code, stdout, err = medcl(capsys, "ingest", str(src), "--out", str(out), "--workers", "1")
    assert_clean(code, stdout, err, 0)
    assert len(list((out / "images").glob("*.nii.gz"))) == n
    assert not list(tmp_path.glob(".ds.tmp-*"))  # the killed run's work folder was cleaned by the next run
    assert all_paths(tmp_path) - all_paths(src) - {str(src)} <= all_paths(out) | {str(out)}


TRAIN_ARGS = ["--image-size", "32", "--device", "cpu", "--deterministic", "--seed", "7",
              "--batch-size", "4", "--set", "model.channels=[8,16,32]", "--set", "train.checkpoint_every=1",
              "--set", "train.val_every=2", "--set", "train.log_every=1"]


@pytest.mark.parametrize("stage,method,steps", [
    ("finetune", "supervised", 8),
    pytest.param("pretrain", "simclr", 30, marks=pytest.mark.slow),  # same loop and checkpoint code: slow suite
])
def test_kill9_training_resumes_to_the_same_weights(tiny_dataset, tmp_path, capsys, stage, method, steps):
    from medcl_cli.engine import checkpoint

    args = [stage, "--data", str(tiny_dataset), "--method", method, *TRAIN_ARGS, "--steps", str(steps)]
    full, cut = tmp_path / "full", tmp_path / "cut"
    code, out, err = medcl(capsys, *args, "--out", str(full))
    assert_clean(code, out, err, 0)
    kill9_when([*args, "--out", str(cut)], path=cut / "checkpoints" / "last.pt")
    last = cut / "checkpoints" / "last.pt"
    assert last.is_file() and 1 <= checkpoint.load(last)["step"] < steps
    assert json.loads((cut / "run.json").read_text()).get("status") != "completed"
    code, out, err = medcl(capsys, stage, "--resume", str(cut))
    assert_clean(code, out, err, 0)
    a, b = checkpoint.load(full / "checkpoints" / "last.pt"), checkpoint.load(last)
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not list(cut.rglob(".tmp-*"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_removes_the_temporaries_of_a_write_the_kill_interrupted(tmp_path):
    # a kill -9 inside atomic_path leaves its .tmp-<pid>-* file (the kill test above hits that window now and then)
    from medcl_cli.engine.runs import RunFolder

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    dead = _dead_pid()
    stale = [run / f".tmp-{dead}-k1.txt", run / "checkpoints" / f".tmp-{dead}-k2.pt"]
    for p in stale:
        p.write_bytes(b"partial")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        writing = run / f".tmp-{live.pid}-k3.txt"  # another live process's write in progress: left alone
        writing.write_bytes(b"partial")
        (run / "checkpoints" / "last.pt").write_bytes(b"kept")
        (run / "run.json").write_text(json.dumps({"status": "running"}))
        RunFolder(run).start({"method": "supervised"}, "x: 1\n", resume_step=3)
    finally:
        live.kill()
        live.wait()
    assert not any(p.exists() for p in stale)
    assert writing.read_bytes() == b"partial"
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"kept"
    assert json.loads((run / "run.json").read_text())["resumed"][0]["at_step"] == 3


def test_kill9_predict_completes_only_missing_cases(tmp_path, capsys):
    run = V.write_run(tmp_path / "run")
    src = tmp_path / "scans"
    src.mkdir()
    for i in range(8):
        img, _ = V.blob_volume((96, 88, 8), seed=200 + i)
        sitk.WriteImage(V.oblique_image(img), str(src / f"scan{i}.nii.gz"))
    out = tmp_path / "preds"
    kill9_when(["predict", str(run), str(src), "--out", str(out), "--device", "cpu", "--batch-size", "2"],
               path=out / "scan1.json")
    done = {p.name[:-5] for p in out.glob("*.json")}
    assert 1 <= len(done) < 8
    (out / f".tmp-{_dead_pid()}-x.nii.gz").write_bytes(b"partial")  # as a kill inside a write leaves it
    code, stdout, err = medcl(capsys, "predict", str(run), str(src), "--out", str(out), "--device", "cpu", "--json")
    assert_clean(code, stdout, err, 0)
    res = json.loads(stdout)
    assert sorted(res["skipped"]) == sorted(done) and sorted(res["written"]) == sorted({f"scan{i}" for i in range(8)} - done)
    assert not list(out.glob(".tmp-*"))
    for i in range(8):
        assert sitk.ReadImage(str(out / f"scan{i}.nii.gz")).GetSize() == (96, 88, 8)


# ---------------------------------------------------------------- damaged checkpoints through every command
@pytest.fixture(scope="module")
def damaged_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    good = V.write_run(root / "good")
    data = (good / "checkpoints" / "best.pt").read_bytes()
    runs = {}
    for kind, payload in (("truncated", data[: len(data) // 3]), ("zeroed", bytes(len(data))), ("empty", b""),
                          ("text", b"not a checkpoint\n")):
        r = root / kind
        (r / "checkpoints").mkdir(parents=True)
        (r / "checkpoints" / "best.pt").write_bytes(payload)
        shutil.copy(good / "run.json", r / "run.json")
        runs[kind] = r
    return runs


@pytest.mark.parametrize("kind", ["truncated", "zeroed", "empty", "text"])
def test_damaged_checkpoint_is_a_clear_error(damaged_runs, kind, tmp_path, capsys):
    run = damaged_runs[kind]
    data = V.write_dataset(tmp_path / "data", {"c0": "train", "c1": "val"})
    scan = data / "images" / "c1.nii.gz"
    for args in (["predict", str(run), str(scan), "--out", str(tmp_path / "p"), "--device", "cpu"],
                 ["evaluate", str(run), "--data", str(data), "--split", "val", "--out", str(tmp_path / "e"),
                  "--device", "cpu"],
                 ["predict", str(run / "checkpoints" / "best.pt"), str(scan), "--out", str(tmp_path / "p2")]):
        code, out, err = medcl(capsys, *args)
        assert_clean(code, out, err, 4)
        assert "checkpoint" in err
    code, out, err = medcl(capsys, "finetune", "--data", str(data), "--init-from", str(run), "--out",
                           str(tmp_path / "ft"), "--steps", "1", "--image-size", "16", "--device", "cpu")
    assert_clean(code, out, err, 4)


def test_resume_from_a_truncated_last_checkpoint(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = medcl(capsys, "finetune", "--data", str(tiny_dataset), "--out", str(run), "--steps", "1",
                           "--image-size", "16", "--device", "cpu", "--set", "model.channels=[4,8]")
    assert_clean(code, out, err, 0)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:500])
    code, out, err = medcl(capsys, "finetune", "--resume", str(run), "--steps", "2")
    assert_clean(code, out, err, 4)
    assert "truncated or corrupted" in err


# ---------------------------------------------------------------- disk full, out of memory, unwritable output
@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MB tmpfs filled up to ~0 bytes free; None when mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                            capture_output=True).returncode == 0
    except OSError:  # no mount binary
        ok = False
    if not ok:
        yield None
        return
    try:
        with open(mnt / "filler", "wb") as fh:
            try:
                fh.write(bytes(3 << 20))
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_exits_7(small_disk, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    g.write_series(src / "s", g.volume(6, 32, 32))
    run = V.write_run(tmp_path / "run")
    scan = tmp_path / "scan.nii.gz"
    img, _ = V.blob_volume((40, 40, 5), seed=3)
    sitk.WriteImage(V.oblique_image(img), str(scan))
    if small_disk is None:  # no mount permission: the writers fail with ENOSPC in-process
        small_disk = tmp_path / "sim"

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))

        monkeypatch.setattr(sitk, "WriteImage", full)
    before = tree_digest(src)
    for args in (["ingest", str(src), "--out", str(small_disk / "ds"), "--workers", "1"],
                 ["predict", str(run), str(scan), "--out", str(small_disk / "p"), "--device", "cpu"]):
        code, out, err = medcl(capsys, *args)
        assert_clean(code, out, err, 7)
        assert "disk full" in err and "free space" in err
    assert not (small_disk / "ds").exists()
    assert not (small_disk / "p").exists() or not list((small_disk / "p").glob("*.nii.gz"))
    assert tree_digest(src) == before


def test_checkpoint_write_on_full_disk_exits_7(tiny_dataset, tmp_path, capsys, monkeypatch):
    """torch reports ENOSPC as a RuntimeError of its zip writer; the CLI still says 'disk full' (exit 7)."""
    import shutil as sh

    from medcl_cli.engine import checkpoint

    def broken_save(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(100, 100, 0))
    code, out, err = medcl(capsys, "finetune", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--steps",
                           "1", "--image-size", "16", "--device", "cpu", "--set", "model.channels=[4,8]")
    assert_clean(code, out, err, 7)
    assert "disk full" in err


@pytest.mark.parametrize("exc", ["cuda", "host"])
def test_out_of_memory_exits_7_with_a_hint(tiny_dataset, tmp_path, capsys, monkeypatch, exc):
    from medcl_cli.models.unet import UNet

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if exc == "cuda" else MemoryError()

    def oom(self, *a, **k):
        raise error

    monkeypatch.setattr(UNet, "forward", oom)
    code, out, err = medcl(capsys, "finetune", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--steps",
                           "2", "--image-size", "16", "--device", "cpu", "--set", "model.channels=[4,8]")
    assert_clean(code, out, err, 7)
    assert "memory" in err and ("--batch-size" in err or "--image-size" in err)
    run = V.write_run(tmp_path / "r2")
    scan = tmp_path / "scan.nii.gz"
    img, _ = V.blob_volume((40, 40, 5), seed=3)
    sitk.WriteImage(V.oblique_image(img), str(scan))
    code, out, err = medcl(capsys, "predict", str(run), str(scan), "--out", str(tmp_path / "p"), "--device", "cpu")
    assert_clean(code, out, err, 7)
    assert "--batch-size" in err


def test_unwritable_output_exits_6(tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    src = tmp_path / "in"
    g.write_series(src / "s", g.volume(4))
    run = V.write_run(tmp_path / "run")
    scan = tmp_path / "scan.nii.gz"
    img, _ = V.blob_volume((40, 40, 5), seed=3)
    sitk.WriteImage(V.oblique_image(img), str(scan))
    for args in (["ingest", str(src), "--out", str(blocker / "ds")],
                 ["predict", str(run), str(scan), "--out", str(blocker / "p"), "--device", "cpu"],
                 ["finetune", "--data", str(tiny_dataset), "--out", str(blocker / "run"), "--steps", "1",
                  "--image-size", "16", "--device", "cpu"],
                 ["evaluate", str(run), "--data", str(V.write_dataset(tmp_path / "d", {"c0": "val"})), "--split", "val",
                  "--out", str(blocker / "e"), "--device", "cpu"],
                 ["export", str(tiny_dataset), "--format", "monai", "--out", str(blocker / "x")]):
        code, out, err = medcl(capsys, *args)
        assert_clean(code, out, err, 6)
    assert blocker.read_text() == "x"


def test_text_writers_keep_the_old_file_when_a_write_fails(tmp_path):
    """Every CSV/JSON/HTML/PNG writer goes through atomic_path: a failure mid-write leaves the old file."""
    import pandas as pd

    from medcl_cli.core.files import write_csv_atomic, write_json_atomic, write_rows_atomic

    class Unwritable:  # json.dumps(default=str) calls str() on it: fails after the file was opened
        def __str__(self) -> str:
            raise RuntimeError("cannot serialise")

    target = tmp_path / "out.json"
    write_json_atomic({"a": 1}, target)
    with pytest.raises(RuntimeError, match="cannot serialise"):
        write_json_atomic({"a": Unwritable()}, target)
    assert json.loads(target.read_text()) == {"a": 1}

    rows = tmp_path / "rows.csv"
    write_rows_atomic([{"x": 1}], ["x"], rows)
    with pytest.raises(RuntimeError):
        write_rows_atomic([{"x": 2}, {"x": Unwritable()}], ["x"], rows)  # the first row was already written
    assert rows.read_text().split() == ["x", "1"]
    write_csv_atomic(pd.DataFrame({"y": [3]}), tmp_path / "df.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["df.csv", "out.json", "rows.csv"]  # no temp files left
