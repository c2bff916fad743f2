"""Load (slow; run with `python -m pytest -m slow tests/test_load.py -s`): ingest of 20 000 small DICOM files in
bounded memory and linear time, predict over 200 volumes in one call, and flat memory over a training run on a
5 000-slice dataset. Peak RSS is the sum over the process tree (worker processes included), sampled from /proc.
The measured numbers are printed (`-s`) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import dicomgen as g

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")]
REPO = Path(__file__).resolve().parents[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, in MB."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_measured(args: list[str], every: float = 0.2) -> tuple[int, float, list[tuple[float, float]], str]:
    """(exit code, seconds, [(t, tree RSS MB)], stderr tail) of `medcl ARGS` in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "medcl_cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    samples: list[tuple[float, float]] = []
    import threading

    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    while proc.poll() is None:
        samples.append((time.perf_counter() - t0, tree_rss_mb(proc.pid)))
        time.sleep(every)
    reader.join()
    tail = b"".join(err).decode(errors="replace")[-2000:]
    return proc.returncode, time.perf_counter() - t0, samples, tail


def _dicom_tree(root: Path, n_series: int, per_series: int = 50) -> Path:
    for s in range(n_series):
        g.write_series(root / f"patient{s // 4:04d}" / f"series{s % 4}", g.volume(per_series, 8, 8, seed=s),
                       description=f"load {s}", names=[f"IM{k:05d}" for k in range(per_series)])
    return root


def test_ingest_20000_files_bounded_memory_linear_time(tmp_path):
    results = {}
    for n_series in (100, 400):  # 5 000 and 20 000 files
        src = _dicom_tree(tmp_path / f"in{n_series}", n_series)
        code, secs, samples, err = run_measured(["ingest", str(src), "--out", str(tmp_path / f"ds{n_series}")])
        assert code == 0, err
        assert len(list((tmp_path / f"ds{n_series}" / "images").glob("*.nii.gz"))) == n_series
        results[n_series * 50] = (secs, max(r for _, r in samples))
        print(f"\ningest {n_series * 50} files / {n_series} series: {secs:.1f} s, peak tree RSS {results[n_series * 50][1]:.0f} MB")
    (t5, m5), (t20, m20) = results[5000], results[20000]
    assert t20 / t5 < 4 * 1.5, "ingest time grows faster than the file count"
    assert m20 < m5 * 1.5 + 100, "ingest memory grows with the file count (headers must be streamed)"


def test_predict_200_volumes_in_one_call(tmp_path):
    import volumes as V

    run = V.write_run(tmp_path / "run")
    src = tmp_path / "scans"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        img, _ = V.blob_volume((64, 64, 8), seed=1000 + i, scale=float(rng.uniform(100, 500)))
        sitk.WriteImage(V.oblique_image(img), str(src / f"vol{i:03d}.nii.gz"))
    code, secs, samples, err = run_measured(["predict", str(run), str(src), "--out", str(tmp_path / "p"),
                                             "--device", "cpu"])
    assert code == 0, err
    assert len(list((tmp_path / "p").glob("*.json"))) == 200
    rss = [r for _, r in samples]
    third = max(1, len(rss) // 3)
    print(f"\npredict 200 volumes: {secs:.1f} s ({secs / 200 * 1000:.0f} ms/volume), peak tree RSS {max(rss):.0f} MB, "
          f"first third max {max(rss[:third]):.0f} MB, last third max {max(rss[-third:]):.0f} MB")
    assert max(rss[-third:]) <= max(rss[:third]) * 1.10 + 30, "memory grows over the cases"


def test_training_memory_flat_over_epochs(tmp_path):
    from medcl_cli.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n_patients=250, n_slices=10, shape_yx=(48, 48), val_patients=5)
    code, secs, samples, err = run_measured(
        ["finetune", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1800", "--batch-size", "8",
         "--image-size", "48", "--device", "cpu", "--set", "model.channels=[8,16,32]", "--set", "train.val_every=400",
         "--set", "train.checkpoint_every=200"], every=0.5)
    assert code == 0, err
    train = samples[len(samples) // 10:]  # after start-up (imports, slice cache)
    third = max(1, len(train) // 3)
    first, last = max(r for _, r in train[:third]), max(r for _, r in train[-third:])
    print(f"\nfinetune on 5000 slices, 1800 steps (~3 epochs of 4 900 training slices at batch 8): {secs:.1f} s, "
          f"RSS first third max {first:.0f} MB, last third max {last:.0f} MB, {len(samples)} samples")
    assert last <= first * 1.05 + 20, "training memory grows over epochs"
