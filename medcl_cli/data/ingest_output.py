"""Where `medcl ingest` writes: the --out checks, the work folder, the final swap, and what the walk skips.

The dataset is written into a work folder beside `--out` (`.<name>.tmp-<id>`) and renamed into place at
the end, under the lock of core/lock.py. The swap replaces only what it checked at the start: `--out` that
was absent or empty (or present with --overwrite); a folder that appeared or was replaced meanwhile is never
deleted. Earlier medcl datasets (a folder with dataset.json and cases.csv), `--out` itself and the work
folders beside it are skipped by the walk, so a re-ingest with `--out` inside the input does not read its
own output back as new cases.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medcl_cli.core.report import Reporter
from medcl_cli.data.dicom.cases import ReportRow
from medcl_cli.data.dicom.scan import Walked
from medcl_cli.errors import OutputError


@dataclass(frozen=True)
class OutputState:
    """What `--out` was when ingest checked it: (device, inode) of the folder, or None when absent."""

    identity: tuple[int, int] | None
    overwrite: bool


def _identity(out: Path) -> tuple[int, int] | None:
    try:
        st = out.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


REPORT = "ingest_report.csv"


def holds_result(out: Path) -> bool:
    """`out` holds something besides the report of a failed ingest (which a new ingest may replace)."""
    return out.is_dir() and any(p.name != REPORT for p in out.iterdir())


def check_output(out: Path, overwrite: bool) -> OutputState:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is a file", "choose a folder path")
    if holds_result(out) and not overwrite:
        raise OutputError(f"--out {out} exists and is not empty", "add --overwrite to replace it, or choose a new folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out.parent}: {exc.strerror}", "check permissions or choose another folder") from None
    return OutputState(_identity(out), overwrite)


def make_work(out: Path) -> Path:
    """The work folder beside `out` (images/, labels/); the owner's pid is in its name, so no `.pid` file
    inside it can reach the dataset."""
    work = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (work / "images").mkdir(parents=True)
        (work / "labels").mkdir()
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # a full disk is exit 7 (cli/app.py), not a bad --out
        raise OutputError(f"cannot create a temporary folder beside --out in {out.parent}: "
                          f"{exc.strerror or exc}", "choose an --out on a writable disk") from None
    return work


def remove_stale_work(out: Path) -> None:
    """Delete the half-written work folders of ingests into `out` that were killed (kill -9, power loss):
    their process is gone, so nothing will finish or clean them."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            named = re.fullmatch(re.escape(f".{out.name}.tmp-") + r"(\d+)-[0-9a-f]{8}", stale.name)
            # an older medcl kept the pid in a `.pid` file inside the folder
            pid = int(named.group(1)) if named else int((stale / ".pid").read_text())
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # another ingest into the same --out is running: leave it alone
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # no readable pid (not ours, or still being created)
        shutil.rmtree(stale, ignore_errors=True)


WORK_FILES = (".masks", ".channels")  # the work folder's own scratch: none of it reaches the finished dataset


def swap_into_place(work: Path, out: Path, state: OutputState) -> None:
    """Rename `work` onto `out`; the previous `out` is removed only when it is the folder checked at start."""
    for name in WORK_FILES:
        shutil.rmtree(work / name, ignore_errors=True)
    now = _identity(out)
    if now is not None and (now != state.identity or (holds_result(out) and not state.overwrite)):
        raise OutputError(f"--out {out} was created or replaced by someone else while this ingest ran; "
                          "it is left as it is and this result is discarded",
                          "run ingest again into another folder (or with --overwrite)")
    old = None
    if now is not None:
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    try:
        work.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)  # the previous dataset goes back where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def report_path_on_failure(out: Path) -> Path:
    """Where the report of an ingest that produced no case goes: into `--out` when it holds no result
    (created if needed), else beside it, so an earlier dataset is never mixed with it."""
    if holds_result(out):
        return out.parent / f"{out.name}.{REPORT}"
    out.mkdir(exist_ok=True)
    return out / REPORT


def is_dataset_folder(folder: Path) -> bool:
    return (folder / "dataset.json").is_file() and (folder / "cases.csv").is_file()


def skipped_roots(walked: Walked, inputs: list[Path], out: Path) -> list[Path]:
    """Folders under the input folders that the walk must not read: `--out`, its work/old/lock siblings,
    and every earlier medcl dataset folder (dataset.json + cases.csv), found among the walked files (no
    second walk of the tree)."""
    roots: set[Path] = set()
    tops = {inp.resolve() for inp in inputs if inp.is_dir()}
    for root in tops:
        if out == root or root in out.parents:
            roots.add(out)
            roots.update(out.parent.glob(f".{out.name}.*"))
    for src in walked.dicom:
        if src.member is None and src.path.endswith("dataset.json"):
            folder = Path(src.path).parent.resolve()
            if folder not in tops and Path(src.path).name == "dataset.json" and is_dataset_folder(folder):
                roots.add(folder)
    return sorted(roots)


def under(path: str | Path, roots: list[Path]) -> Path | None:
    """The root of `roots` that holds `path` (resolved), or None."""
    p = Path(path).resolve()
    for r in roots:
        if p == r or r in p.parents:
            return r
    return None


def skip_own_outputs(walked: Walked, inputs: list[Path], out: Path, display: Callable[[str], str],
                     rep: Reporter) -> list[ReportRow]:
    """Drop, in place, what the walk found under `skipped_roots`; one `ignored:medcl-output` row (and a log
    line) per skipped folder, so the user sees it was not read."""
    roots = skipped_roots(walked, inputs, out)
    if not roots:
        return []
    hits: Counter[Path] = Counter()

    def keep(path: str | Path) -> bool:
        root = under(path, roots)
        if root is not None:
            hits[root] += 1
        return root is None

    walked.volumes = [v for v in walked.volumes if keep(v)]
    walked.dicom = [s for s in walked.dicom if keep(s.path)]
    walked.issues = [i for i in walked.issues if keep(i.source.path)]
    rows = []
    for root, n in sorted(hits.items()):
        what = "the --out folder of this ingest" if root == out or root.name.startswith(f".{out.name}.") \
            else "an earlier medcl dataset (dataset.json + cases.csv)"
        reason = f"{what}: its {n} file(s) are not read as inputs"
        rows.append(ReportRow(display(str(root)), "folder", "ignored:medcl-output", reason, files=n))
        rep.log(f"skipped {display(str(root))}: {reason}", "warning")
    return rows
