"""`medcl ingest` against `dcm2niix` on the shared DICOM folders (benchmark.md section 3).

For each folder both tools run as command-line programs on the same cores (`dcm2niix -z y`, gzip output,
like medcl's `.nii.gz`), `--repeats` times; the median wall time is reported with the ratio. Then every
volume medcl writes is matched with dcm2niix's volumes (4D outputs split per time point) after both are
brought to RAS canonical orientation: same voxels (exactly, or to float32 precision for rescaled data) and
the largest affine difference in mm. Volumes one tool writes and the other does not are listed.
Prints a Markdown table and writes results.json.

    python benchmarks/ingest.py --data ../shared/data --out bench_ingest
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
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
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
