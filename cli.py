"""Command-line face of headbench: thin typer commands over :mod:`pipeline`.

Run as ``python cli.py COMMAND`` from the repository root, or as ``headbench COMMAND`` once installed.
Expected failures print one line to stderr and exit with status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.errors import HeadbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Extract frozen CNN features once, then compare classifier heads in seconds.",
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console-script entry point: run the app, turning expected errors into one line on stderr."""
    try:
        app()
    except HeadbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)


# ---- commands (each one calls a single pipeline function) ----------------------------------------------------


if __name__ == "__main__":
    main()
