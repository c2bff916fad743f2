"""How library code reports progress and log lines without printing.

Library functions take a `Reporter` (default: `NullReporter`) and call it; the CLI passes one that
renders a rich progress bar on a terminal, or plain flushed lines otherwise (cli/console.py).
"""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def log(self, message: str, level: str = "info") -> None:
        """A log line: level is debug | info | warning."""

    def start(self, task: str, total: int | None) -> None:
        """Begin a task of `total` units (None when unknown)."""

    def advance(self, task: str, n: int = 1, **fields: object) -> None:
        """Progress on a task; `fields` are shown beside it (loss, dice, ...)."""

    def finish(self, task: str) -> None:
        """End a task."""


class NullReporter:
    """Discards everything: the default for library calls and tests."""

    def log(self, message: str, level: str = "info") -> None:
        pass

    def start(self, task: str, total: int | None) -> None:
        pass

    def advance(self, task: str, n: int = 1, **fields: object) -> None:
        pass

    def finish(self, task: str) -> None:
        pass


class ListReporter(NullReporter):
    """Keeps log lines in a list (used by tests and by commands that write them to a log file)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def log(self, message: str, level: str = "info") -> None:
        self.lines.append((level, message))


class ForwardingReporter:
    """Passes progress on to `inner`; a subclass changes what happens to log lines (scrubbed, copied)."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner

    def log(self, message: str, level: str = "info") -> None:
        self.inner.log(message, level)

    def start(self, task: str, total: int | None) -> None:
        self.inner.start(task, total)

    def advance(self, task: str, n: int = 1, **fields: object) -> None:
        self.inner.advance(task, n, **fields)

    def finish(self, task: str) -> None:
        self.inner.finish(task)
