"""The `medcl` command: one Typer app, one small module per command.

Command modules import torch only inside their functions, so `medcl --help` stays instant. `main()`
catches `MedclError` once and prints `error:`/`hint:` lines with the exit code of conventions.md 4.3;
an unexpected exception prints a short message (the traceback goes to the log only with --verbose,
and never with local variables, which may hold patient data).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from medcl_cli import __version__
from medcl_cli.cli import console

EXIT_CODES_HELP = (
    "Exit codes: 0 success, 1 internal error, 2 usage error, 3 input not found, 4 invalid data, "
    "5 partial success, 6 output not writable or exists, 7 out of memory or disk, 130 interrupted."
)

app = typer.Typer(
    name="medcl",
    help=(
        "medcl: contrastive learning for label-efficient medical image segmentation.\n\n"
        "ingest DICOM/NIfTI folders -> pretrain -> finetune on a few masks -> evaluate -> predict.\n\n"
        + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        console.result(f"medcl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs and full tracebacks of internal errors.")] = False,
) -> None:
    """medcl: contrastive learning for label-efficient medical image segmentation."""
    console.VERBOSITY.level = 0 if quiet else (2 if verbose else 1)


def _register() -> None:
    """Attach every command module (each imports only typer at module level)."""
    from medcl_cli.cli import commands

    commands.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `medcl` script and `python -m medcl_cli`."""
    from medcl_cli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_RESOURCE, MedclError

    try:
        # standalone mode: typer prints usage errors itself (exit 2) and exits via SystemExit
        app(args=argv, prog_name="medcl")
    except MedclError as exc:
        console.print_error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except MemoryError:
        console.print_error(
            "out of host memory", "use a smaller --batch-size or --image-size, or --set data.cache=disk"
        )
        sys.exit(EXIT_RESOURCE)
    except OSError as exc:
        import errno

        if exc.errno == errno.ENOSPC:
            console.print_error(f"disk full while writing {exc.filename or 'output'}", "free space or write elsewhere")
            sys.exit(EXIT_RESOURCE)
        if exc.errno in (errno.ENOTDIR, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.EEXIST):
            from medcl_cli.errors import EXIT_OUTPUT

            console.print_error(f"cannot write {exc.filename or 'the output'}: {exc.strerror}",
                                "give an --out folder you can write to (a path under a file or a read-only mount fails)")
            sys.exit(EXIT_OUTPUT)
        _internal(exc)
        sys.exit(EXIT_INTERNAL)
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a short message
        if _is_oom(exc):
            console.print_error("out of GPU memory", "use a smaller --batch-size or --image-size, or --device cpu")
            sys.exit(EXIT_RESOURCE)
        _internal(exc)
        sys.exit(EXIT_INTERNAL)


def _is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _internal(exc: BaseException) -> None:
    """A short message for a bug; the traceback (without locals) only with --verbose."""
    console.print_error(
        f"internal error: {type(exc).__name__}: {exc}",
        "this is a bug in medcl; rerun with --verbose for the traceback and report it",
    )
    if console.VERBOSITY.level >= 2:
        import traceback

        console.stderr.print("".join(traceback.format_exception(exc)), markup=False)
