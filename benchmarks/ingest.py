"""`medcl ingest` against `dcm2niix` on the shared DICOM folders (benchmark.md section 3).

For each folder both tools run as command-line programs on the same cores (`dcm2niix -z y`, gzip output,
like medcl's `.nii.gz`), `--repeats` times; the median wall time is reported with the ratio. Then every
volume medcl writes is matched with dcm2niix's volumes (4D outputs split per time point) after both are
brought to RAS canonical orientation: same voxels (exactly, or to float32 precision for rescaled data) and
the largest affine difference in mm. Volumes one tool writes and the other does not are listed.
Prints a Markdown table and writes results.json.

    python benchmarks/ingest.py --data ../shared/data --out bench_ingest

`--synthetic N` is the scale test instead: it writes N single-frame 64 x 64 MR files in 20 series (N/20
slices each, realistic headers, opaque file names in one folder per series) and runs dcm2niix and medcl
on that folder alternately (A B A B, `--repeats` pairs, so load from other users of the machine falls on
both), reporting wall time, the ratio, and the peak memory of each tool's whole process tree (the largest
sum of RSS over the tool and its workers, sampled every 20 ms), then checks every medcl volume is
voxel-identical to the series written.

    python benchmarks/ingest.py --synthetic 20000 --out bench_scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

# folder -> the DICOM inputs given to medcl (the folders also hold reference NIfTI/NRRD files that medcl would
# ingest as volumes and dcm2niix ignores) and extra medcl options
FOLDERS: dict[str, tuple[list[str], list[str]]] = {
    "tcia_brain_tumor_progression_dicom": (["."], ["--label-series", "Mask"]),
    "dcm_qa_nih_ge_siemens_epi": (["GE_mr_0004", "Siemens_mr_0003"], []),
    "dcm_qa_enh_multiframe": (["In"], []),
    "dcmqi_ct_liver_seg": (["ct_3slice", "liver_seg_dicom_SEG.dcm"], []),
    # dcm2niix writes single-slice files too: keep them for the comparison
    "pydicom_data_multiframe": (["."], ["--set", "ingest.keep_localizers=true"]),
}


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU s = user + system of the process and its workers, exit code). CPU time is the fair number
    on a shared machine, where wall time mostly measures the other users."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def write_synthetic(root: Path, n_files: int, n_series: int = 20, size: int = 64) -> list[np.ndarray]:
    """n_files 2D MR files in n_series series (one folder each) under root; returns each series' volume."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    rng = np.random.default_rng(0)
    per = n_files // n_series
    vols = []
    for s in range(n_series):
        folder = root / f"series{s:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID = f"Scale^Patient{s // 2:02d}", f"SCALE{s // 2:03d}"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600101", "F", "066Y"
        ds.InstitutionName = "Benchmark Hospital"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1024.9.{s // 2}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1024.9.{s // 2}.{s}"
        ds.FrameOfReferenceUID = ds.StudyInstanceUID + ".1"
        ds.StudyDate = ds.SeriesDate = "20260315"
        ds.Modality, ds.Manufacturer = "MR", "medcl benchmark"
        ds.SeriesNumber, ds.SeriesDescription = s + 1, f"T1 axial {s}"
        ds.EchoTime, ds.RepetitionTime, ds.ImageType = "10", "500", ["ORIGINAL", "PRIMARY", "M"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.9, 0.8], "1.0"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        vol = rng.integers(0, 4096, size=(per, size, size), dtype=np.uint16)
        vols.append(vol)
        for k in range(per):
            ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{k + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = per - k  # against the slice direction: only the positions give the order
            ds.ImagePositionPatient = [-30.0, -20.0, 1.0 * k]
            ds.SliceLocation = f"{k:.1f}"
            ds.PixelData = vol[k].tobytes()
            ds.save_as(folder / f"IM{(k * 7919) % per:05d}", enforce_file_format=True)
    return vols


def _tree(root: int) -> list[int]:
    """root and every descendant process, from /proc/*/stat (Linux)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(c for c, pp in parent.items() if pp == pid)
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """(PSS kB, RSS kB) of one process (0, 0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    vals = {ln.split(":")[0]: int(ln.split()[1]) for ln in text.splitlines()[1:] if ln.split()[-1] == "kB"}
    return vals.get("Pss", 0), vals.get("Rss", 0)


def peak_tree_mb(cmd: list[str]) -> tuple[float, float, float, float, int]:
    """(wall s, CPU s of the tree, peak MB of the summed PSS and of the summed RSS of the process tree, exit
    code), sampled every 20 ms. PSS counts pages shared by forked workers once; RSS counts them in every
    worker. CPU time (user + system, workers included) is the number that carries over to an idle machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pss = rss = 0
    while proc.poll() is None:
        mems = [_mem_kb(p) for p in _tree(proc.pid)]
        pss, rss = max(pss, sum(m[0] for m in mems)), max(rss, sum(m[1] for m in mems))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, pss / 1024, rss / 1024, proc.returncode


def scale(n: int, out: Path, repeats: int) -> int:
    src = out / f"synthetic_{n}"
    if not (src / "volumes.npz").exists():
        shutil.rmtree(src, ignore_errors=True)
        vols = write_synthetic(src / "dicom", n)
        np.savez(src / "volumes.npz", *vols)
    vols = list(np.load(src / "volumes.npz").values())
    d2n: list[tuple[float, float, float, float]] = []
    med: list[tuple[float, float, float, float]] = []
    for _ in range(repeats):
        d2n_out = out / "scale.d2n"
        shutil.rmtree(d2n_out, ignore_errors=True)
        d2n_out.mkdir()
        t, cpu, pss, rss, rc = peak_tree_mb([_bin("dcm2niix"), "-z", "y", "-b", "n", "-f", "%s_%d", "-o",
                                             str(d2n_out), str(src / "dicom")])
        if rc != 0:
            print(f"dcm2niix exited {rc}", file=sys.stderr)
            return 1
        d2n.append((t, cpu, pss, rss))
        # python -m medcl_cli: the checkout this script lives in (with PYTHONPATH), not another install's medcl
        t, cpu, pss, rss, rc = peak_tree_mb([sys.executable, "-m", "medcl_cli", "ingest", str(src / "dicom"),
                                             "--out", str(out / "scale.medcl"), "--overwrite"])
        if rc != 0:
            print(f"medcl ingest exited {rc}", file=sys.stderr)
            return 1
        med.append((t, cpu, pss, rss))
    cases = pd.read_csv(out / "scale.medcl" / "cases.csv")
    identical = 0
    for i, row in cases.iterrows():
        arr = np.asarray(nib.load(out / "scale.medcl" / row["image"]).dataobj)  # x, y, z
        identical += int(np.array_equal(arr.transpose(2, 1, 0), vols[i]))
    t_d, t_m = statistics.median(r[0] for r in d2n), statistics.median(r[0] for r in med)
    c_d, c_m = statistics.median(r[1] for r in d2n), statistics.median(r[1] for r in med)
    ratios = [m[0] / d[0] for d, m in zip(d2n, med)]
    result = {"files": n, "series": len(vols), "dcm2niix_s": [r[0] for r in d2n], "medcl_s": [r[0] for r in med],
              "ratio": statistics.median(ratios), "pair_ratios": ratios,
              "dcm2niix_cpu_s": [r[1] for r in d2n], "medcl_cpu_s": [r[1] for r in med], "cpu_ratio": c_m / c_d,
              "dcm2niix_peak_pss_mb": max(r[2] for r in d2n), "dcm2niix_peak_rss_mb": max(r[3] for r in d2n),
              "medcl_peak_pss_mb": max(r[2] for r in med), "medcl_peak_rss_mb": max(r[3] for r in med),
              "identical": identical, "volumes": len(cases), "date": time.strftime("%Y-%m-%d"),
              "load": os.getloadavg()[0]}
    print(f"load average at the end: {result['load']:.1f} on {os.cpu_count()} cores")
    print("| files | series | dcm2niix s | medcl s | wall ratio (median of pairs) | dcm2niix CPU s | medcl CPU s | "
          "CPU ratio | dcm2niix peak PSS / RSS MB | medcl peak PSS / RSS MB | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {n} | {len(vols)} | {t_d:.2f} | {t_m:.2f} | {result['ratio']:.2f} | {c_d:.2f} | {c_m:.2f} | "
          f"{c_m / c_d:.2f} | {result['dcm2niix_peak_pss_mb']:.0f} / {result['dcm2niix_peak_rss_mb']:.0f} | "
          f"{result['medcl_peak_pss_mb']:.0f} / {result['medcl_peak_rss_mb']:.0f} | {identical}/{len(vols)} |")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return 0 if identical == len(vols) == len(cases) else 1


def reference_volumes(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    vols = []
    for f in sorted(folder.glob("*.nii*")):
        img = nib.load(f)
        data = np.asarray(img.dataobj).astype(np.float64)
        parts = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
        for t, part in enumerate(parts):
            can = nib.as_closest_canonical(nib.Nifti1Image(part, img.affine))
            vols.append((f"{f.name.split('.nii')[0]}[{t}]", np.asarray(can.dataobj), can.affine))
    return vols


def compare(ds: Path, refs: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    cases = pd.read_csv(ds / "cases.csv", keep_default_na=False)
    same, close, unmatched, worst = 0, 0, [], 0.0
    used: set[str] = set()
    for _, row in cases.iterrows():
        can = nib.as_closest_canonical(nib.load(ds / row["image"]))
        vol, aff = np.asarray(can.get_fdata()), can.affine
        hit = None
        for name, data, ref_aff in refs:
            if data.shape != vol.shape:
                continue
            if np.array_equal(data, vol):
                hit, exact = (name, ref_aff), True
                break
            if np.allclose(data, vol, rtol=1e-5, atol=1e-3):
                hit, exact = (name, ref_aff), False
        if hit is None:
            unmatched.append(f"{row['case_id']} {tuple(vol.shape)}")
            continue
        used.add(hit[0])
        same += int(exact)
        close += int(not exact)
        worst = max(worst, float(np.abs(hit[1] - aff).max()))
    only_d2n = [n for n, _, _ in refs if n not in used]
    return {"medcl_volumes": len(cases), "dcm2niix_volumes": len(refs), "identical": same, "float_close": close,
            "max_affine_mm": worst, "medcl_only": unmatched, "dcm2niix_only": only_d2n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("bench_ingest"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folders", nargs="*", default=list(FOLDERS))
    ap.add_argument("--synthetic", type=int, default=0, metavar="N", help="scale test on N synthetic files instead")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        return scale(args.synthetic, args.out, args.repeats)
    rows = []
    for name in args.folders:
        src = args.data / name
        t_d2n, t_medcl, c_d2n, c_medcl = [], [], [], []
        for r in range(args.repeats):
            d2n_out = args.out / f"{name}.d2n"
            shutil.rmtree(d2n_out, ignore_errors=True)
            d2n_out.mkdir()
            t, c, rc = timed([_bin("dcm2niix"), "-z", "y", "-b", "n", "-f", "%s_%d_%j", "-o", str(d2n_out), str(src)])
            t_d2n.append(t)
            c_d2n.append(c)
            inputs, extra = FOLDERS[name]
            t, c, rc_m = timed([_bin("medcl"), "ingest", *[str(src / i) for i in inputs], "--out",
                             str(args.out / f"{name}.medcl"), "--overwrite", *extra])
            t_medcl.append(t)
            c_medcl.append(c)
            if rc_m not in (0, 5):
                print(f"medcl ingest failed on {name} (exit {rc_m})", file=sys.stderr)
        cmp = compare(args.out / f"{name}.medcl", reference_volumes(args.out / f"{name}.d2n"))
        row = {"folder": name, "dcm2niix_s": statistics.median(t_d2n), "medcl_s": statistics.median(t_medcl),
               "dcm2niix_cpu_s": statistics.median(c_d2n), "medcl_cpu_s": statistics.median(c_medcl), **cmp}
        row["ratio"] = row["medcl_s"] / row["dcm2niix_s"]
        row["cpu_ratio"] = row["medcl_cpu_s"] / max(row["dcm2niix_cpu_s"], 1e-3)
        rows.append(row)
    total_d, total_m = sum(r["dcm2niix_s"] for r in rows), sum(r["medcl_s"] for r in rows)
    cpu_d, cpu_m = sum(r["dcm2niix_cpu_s"] for r in rows), sum(r["medcl_cpu_s"] for r in rows)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| folder | dcm2niix wall s | medcl wall s | wall ratio | dcm2niix CPU s | medcl CPU s | CPU ratio | "
          "volumes medcl/dcm2niix | identical | float-close | max affine diff mm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['folder']} | {r['dcm2niix_s']:.2f} | {r['medcl_s']:.2f} | {r['ratio']:.2f} | "
              f"{r['dcm2niix_cpu_s']:.2f} | {r['medcl_cpu_s']:.2f} | {r['cpu_ratio']:.1f} | "
              f"{r['medcl_volumes']}/{r['dcm2niix_volumes']} | {r['identical']} | {r['float_close']} | "
              f"{r['max_affine_mm']:.1e} |")
    print(f"| total | {total_d:.2f} | {total_m:.2f} | {total_m / total_d:.2f} | {cpu_d:.2f} | {cpu_m:.2f} | "
          f"{cpu_m / max(cpu_d, 1e-3):.1f} | | | | |")
    for r in rows:
        if r["medcl_only"] or r["dcm2niix_only"]:
            print(f"\n{r['folder']}: only medcl: {r['medcl_only'] or '-'}; only dcm2niix: {r['dcm2niix_only'] or '-'}")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
