"""The ``hexjax`` command. Each module of this package adds its subcommands
through a ``register(app)`` function, so commands live beside what they run."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from hexjax.errors import HexjaxError

app = typer.Typer(
    name="hexjax",
    help="Plan and run LLMs over uneven, heterogeneous accelerator clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}").register(app)


def main() -> None:
    try:
        app()
    except HexjaxError as e:  # expected, user-facing errors: no traceback
        from rich.console import Console
        from rich.markup import escape
        # soft_wrap: a long message stays one line in logs and pipes (the terminal wraps it)
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(2)
