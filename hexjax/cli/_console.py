"""Where the commands print their tables."""

from __future__ import annotations


def table_console():
    """A rich console on stdout; when piped, 130 columns wide so tables are not squeezed into 80."""
    from rich.console import Console
    con = Console()
    return con if con.is_terminal else Console(width=130)
