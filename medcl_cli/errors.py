"""Errors a user can act on, each mapped to an exit code (conventions.md section 4.3).

Library code raises these with a message (what was expected, what was found, where) and a hint (what
to do). The CLI catches them once and prints `error:` and `hint:` lines, never a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID = 4
EXIT_PARTIAL = 5
EXIT_OUTPUT = 6
EXIT_RESOURCE = 7
EXIT_INTERRUPTED = 130


class MedclError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI returns."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class UsageError(MedclError):
    """A bad option, value or config key (exit 2)."""

    exit_code = EXIT_USAGE


class InputNotFoundError(MedclError):
    """An input path is missing or holds nothing medcl can read (exit 3)."""

    exit_code = EXIT_NOT_FOUND


class InvalidDataError(MedclError):
    """Data failed validation: manifest, geometry, labels, checkpoint contents (exit 4)."""

    exit_code = EXIT_INVALID


class PartialSuccess(MedclError):
    """Some inputs were processed and some were skipped; the report says which (exit 5)."""

    exit_code = EXIT_PARTIAL


class OutputError(MedclError):
    """The output cannot be written, or exists and `--overwrite` was not given (exit 6)."""

    exit_code = EXIT_OUTPUT


class ResourceError(MedclError):
    """Out of memory (host or GPU) or out of disk (exit 7)."""

    exit_code = EXIT_RESOURCE


class Interrupted(MedclError):
    """Ctrl-C or SIGTERM; training has flushed `last.pt` first (exit 130)."""

    exit_code = EXIT_INTERRUPTED


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A "did you mean ...?" suffix for an unknown name, or "" when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else ""


def unknown_choice(kind: str, word: str, choices: Iterable[str]) -> UsageError:
    """A UsageError for an unknown name with a suggestion and the list of valid names."""
    choices = sorted(choices)
    suggestion = did_you_mean(word, choices)
    msg = f"unknown {kind} '{word}'" + (f"; {suggestion}" if suggestion else "")
    return UsageError(msg, f"valid {kind}s: {', '.join(choices)}")
