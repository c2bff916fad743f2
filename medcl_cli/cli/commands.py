"""The list of commands: one module per command, registered here in pipeline order."""

from __future__ import annotations

import importlib

import typer

# (command name, module under medcl_cli.cli, function name)
COMMANDS: list[tuple[str, str, str]] = [
    ("ingest", "ingest", "ingest"),
    ("validate", "validate", "validate"),
    ("pretrain", "pretrain", "pretrain"),
    ("finetune", "finetune", "finetune"),
    ("evaluate", "evaluate", "evaluate"),
    ("predict", "predict", "predict"),
    ("export", "export", "export"),
    ("runs", "runs", "runs"),
    ("info", "info", "info"),
    ("demo", "demo", "demo"),
]


def register(app: typer.Typer) -> None:
    for name, module, func in COMMANDS:
        mod = importlib.import_module(f"medcl_cli.cli.{module}")
        fn = getattr(mod, func)
        app.command(name, help=fn.__doc__, no_args_is_help=getattr(fn, "no_args_is_help", False))(fn)
