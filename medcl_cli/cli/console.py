"""Rendering for the CLI: results to stdout, logs and progress to stderr.

On a terminal, progress is a rich bar with ETA; otherwise one flushed line per update at most every few
seconds (and always at the end), so logs on clusters never look frozen.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stdout = Console(soft_wrap=True, highlight=False)
stderr = Console(stderr=True, soft_wrap=True, highlight=False)


@dataclass
class Verbosity:
    level: int = 1  # 0 quiet, 1 normal, 2 verbose


VERBOSITY = Verbosity()


def info(message: str) -> None:
    if VERBOSITY.level >= 1:
        stderr.print(message, markup=False)


def debug(message: str) -> None:
    if VERBOSITY.level >= 2:
        stderr.print(message, markup=False, style="dim")


def warn(message: str) -> None:
    stderr.print(f"warning: {message}", markup=False, style="yellow")


def result(message: str) -> None:
    """A result line on stdout (paths, summaries): what scripts consume."""
    stdout.print(message, markup=False)


def print_error(message: str, hint: str = "") -> None:
    stderr.print(f"error: {message}", markup=False, style="bold red")
    if hint:
        stderr.print(f"hint: {hint}", markup=False, style="cyan")


def _format_fields(fields: dict[str, object]) -> str:
    parts = []
    for k, v in fields.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


@dataclass
class ConsoleReporter:
    """A Reporter (medcl_cli.report) for the terminal: rich bars on a TTY, plain lines otherwise."""

    tty: bool = field(default_factory=lambda: sys.stderr.isatty())
    interval: float = 5.0
    _progress: Progress | None = None
    _tasks: dict[str, TaskID] = field(default_factory=dict)
    _plain: dict[str, list[float]] = field(default_factory=dict)  # task -> [done, total, last_print, t0]

    def log(self, message: str, level: str = "info") -> None:
        if level == "warning":
            if self._progress is not None:
                self._progress.console.print(f"warning: {message}", markup=False, style="yellow")
            else:
                warn(message)
        elif level == "debug":
            debug(message)
        elif VERBOSITY.level >= 1:
            if self._progress is not None:
                self._progress.console.print(message, markup=False)
            else:
                info(message)

    def start(self, task: str, total: int | None) -> None:
        if VERBOSITY.level < 1:
            return
        if self.tty:
            if self._progress is None:
                self._progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[extra]}"),
                    console=stderr,
                    transient=False,
                )
                self._progress.start()
            self._tasks[task] = self._progress.add_task(task, total=total, extra="")
        else:
            now = time.monotonic()
            self._plain[task] = [0, float(total or 0), now, now]
            stderr.print(f"{task}: started" + (f" ({total})" if total else ""), markup=False)
            stderr.file.flush()

    def advance(self, task: str, n: int = 1, **fields: object) -> None:
        if VERBOSITY.level < 1:
            return
        extra = _format_fields(fields)
        if self.tty and self._progress is not None and task in self._tasks:
            self._progress.update(self._tasks[task], advance=n, extra=extra)
            return
        state = self._plain.get(task)
        if state is None:
            return
        state[0] += n
        now = time.monotonic()
        if now - state[2] >= self.interval or (state[1] and state[0] >= state[1]):
            state[2] = now
            done, total = int(state[0]), int(state[1])
            eta = ""
            if total and done:
                rate = (now - state[3]) / done
                eta = f" eta {int(rate * (total - done))}s"
            stderr.print(f"{task}: {done}/{total or '?'}{eta} {extra}".rstrip(), markup=False)
            stderr.file.flush()

    def finish(self, task: str) -> None:
        if self.tty and self._progress is not None and task in self._tasks:
            self._tasks.pop(task)
            if not self._tasks:
                self._progress.stop()
                self._progress = None
        elif task in self._plain:
            state = self._plain.pop(task)
            if VERBOSITY.level >= 1:
                stderr.print(f"{task}: done {int(state[0])} in {time.monotonic() - state[3]:.1f}s", markup=False)
                stderr.file.flush()
