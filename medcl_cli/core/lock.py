"""A lock file beside an output folder, so two writers never replace each other's result.

`output_lock(out)` creates `.<name>.lock` in the output's parent with O_EXCL and writes the process id into
it. A second writer finds it, sees the process alive and is refused (OutputError, exit 6); a lock left by a
killed process (kill -9, power loss) is taken over. The lock lives beside the folder, never inside it, and
is removed when the block ends, whatever happened.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medcl_cli.errors import OutputError


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _holder(path: Path) -> int | None:
    """The live process holding `path`, or None when the lock is stale (its process is gone)."""
    try:
        pid = int(path.read_text().strip() or "0")
    except (OSError, ValueError):
        return -1  # being written right now by its owner: treat as held
    if pid <= 0:
        return -1
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


@contextmanager
def output_lock(out: Path, what: str = "--out") -> Iterator[Path]:
    """Hold the lock of `out` for the block; OutputError (exit 6) when another live process holds it or the
    parent folder cannot hold a lock file."""
    path = lock_path(out)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _holder(path)
            if pid is not None:
                who = f"process {pid}" if pid > 0 else "another process"
                raise OutputError(f"{what} {out} is being written by {who} (lock {path})",
                                  "wait for it to finish, or choose another folder; if no medcl is running, "
                                  f"delete {path}") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise OutputError(f"cannot create a lock file in {out.parent}: {exc.strerror}",
                              "choose an --out on a writable disk") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:  # pragma: no cover - a stale lock re-created between unlink and open by a third process
        raise OutputError(f"{what} {out} is locked by another process ({path})", "try again")
    try:
        yield path
    finally:
        try:
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()
        except OSError:
            pass
