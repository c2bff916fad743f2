"""How medcl writes files: atomically (temporary file + rename) and with the permissions the user's umask gives.

`tempfile.mkstemp`/`mkdtemp` create 0600 files and 0700 folders whatever the umask, so an output written
through one of them (every atomic write, the export and demo folders) would stay private to its owner even
under `umask 022`. `shareable` gives such a path the mode a plain `open()`/`mkdir()` would have given it
(0o666 / 0o777 masked by the umask); `atomic_path` and `make_tempdir` apply it, and every writer in medcl
goes through one of the two. Scratch folders outside the outputs (`private_tempdir`) stay private.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

DISK_MARGIN = 256 << 10  # a write that failed with less than this free (plus its own size) is a full disk


def raise_if_disk_full(folder: str | Path, needed: int = 0) -> None:
    """Raise OSError(ENOSPC) when `folder`'s file system cannot take `needed` more bytes.

    Called after a write failed: ITK and torch report a full disk as a generic RuntimeError (or not at
    all, leaving a short file), so the CLI could not otherwise give exit 7 with its hint."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed + DISK_MARGIN:
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))


@contextmanager
def atomic_path(path: str | Path, suffix: str, needed: int = 0,
                disk_errors: tuple[type[BaseException], ...] = (RuntimeError, OSError)) -> Iterator[str]:
    """A temporary file beside `path` to write into; renamed onto `path` only when the block succeeds.

    A failure of type `disk_errors` is first checked against the free space (`raise_if_disk_full`, with
    `needed` bytes), so a full disk becomes ENOSPC whatever the writer reported. A failed or interrupted
    write leaves `path` as it was, and the temporary file is removed; only a kill -9 can leave it
    (`.tmp-<pid>-*`), and `remove_stale_temporaries` removes it once that process is gone.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=p.parent)
    os.close(fd)
    try:
        try:
            yield tmp
        except disk_errors:
            raise_if_disk_full(p.parent, needed)
            raise
        shareable(tmp)  # after the writer: one that replaced the file has made a new one
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


TMP_PREFIX = ".tmp-"
_FALLBACK_UMASK: list[int] = []
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc/self/status).

    Elsewhere it can only be read by setting it, which races with other threads creating files, so it is
    read that way once (under a lock) and remembered."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        if not _FALLBACK_UMASK:
            old = os.umask(0o077)
            os.umask(old)
            _FALLBACK_UMASK.append(old)
    return _FALLBACK_UMASK[0]


def shareable(path: str | Path) -> None:
    """Give `path` the mode `open()` (file) or `mkdir()` (folder) would have: 0o666 / 0o777 minus the umask.

    For what `tempfile` created (always 0600 / 0700) before it becomes an output. Only the permission bits
    of a path medcl itself created change; inputs are never passed here."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~current_umask())


def make_tempdir(prefix: str, dir: str | Path) -> Path:
    """`tempfile.mkdtemp` in `dir` with the permissions of a plain mkdir (see `shareable`): for a folder
    that is renamed into place as an output once it is complete."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    shareable(tmp)
    return tmp


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files `atomic_path` left in `folder` when its process was killed in the middle
    of a write (a partial checkpoint can be hundreds of MB); a live process's are left alone."""
    for p in folder.glob(f"{TMP_PREFIX}*"):
        if _left_by_dead_process(p.name, TMP_PREFIX) and p.is_file():
            p.unlink(missing_ok=True)


def _left_by_dead_process(name: str, prefix: str) -> bool:
    """`name` is `<prefix><pid>-...` and process `pid`, not this one, no longer exists."""
    import re

    m = re.match(re.escape(prefix) + r"(\d+)-", name)
    return m is not None and int(m.group(1)) != os.getpid() and not _process_alive(int(m.group(1)))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def private_tempdir(prefix: str) -> Iterator[Path]:
    """A temporary folder named `<prefix><pid>-...`, removed when the block ends.

    A kill -9 skips that removal, and what these folders hold (volumes converted from DICOM, slice
    copies) should not pile up in /tmp: folders of the same prefix left by processes that no longer
    exist (and owned by this user) are removed first."""
    import shutil

    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            mine = old.is_dir() and old.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and _left_by_dead_process(old.name, prefix):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-") as work:
        yield Path(work)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CONTROL = {c: None for c in range(32)} | {9: " ", 10: " ", 13: " ", 127: None}


def _is_number(text: str) -> bool:
    try:
        for part in text.split("\\"):  # DICOM multi-values: -12.5\\40.0\\-3
            float(part)
    except ValueError:
        return False
    return True


def safe_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run (OWASP CSV injection): text beginning with = + - @ tab or CR
    gets a leading `'`, control characters go (tab, CR and LF become spaces). Numbers, and text that is a
    number or a backslash-joined list of numbers (-3.5, -1e-3\\2), are returned unchanged."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith(_FORMULA_START) and not _is_number(value):
        value = "'" + value
    return value.translate(_CONTROL)


def safe_row(row: Iterable[Any]) -> list[Any]:
    return [safe_cell(v) for v in row]


def write_rows_atomic(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    """Write dict rows as CSV (missing keys empty, None empty) atomically, without pandas; every cell
    goes through `safe_cell`."""
    import csv

    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(safe_row(columns))
        for row in rows:
            writer.writerow(safe_row("" if row.get(c) is None else row.get(c, "") for c in columns))


def write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    """A DataFrame as CSV, atomically; text cells and column names go through `safe_cell`."""
    out = df.copy()
    for col in out.columns:
        if getattr(out[col].dtype, "kind", "O") not in "biufcmM":  # object and string columns
            out[col] = out[col].map(safe_cell)
    out.columns = [safe_cell(str(c)) for c in out.columns]
    with atomic_path(path, ".csv") as tmp:
        out.to_csv(tmp, index=False)


def write_json_atomic(data: Any, path: Path) -> None:
    """JSON written atomically; values JSON cannot hold (paths, numpy scalars) are written as strings."""
    write_text_atomic(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", path)


def write_text_atomic(text: str, path: Path) -> None:
    """A UTF-8 text file written atomically (see atomic_path)."""
    with atomic_path(path, ".txt") as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
