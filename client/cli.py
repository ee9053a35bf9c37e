"""A hospital's commands (``fedsr sites check``): they need ``pip install fedsr`` only, never the simulator or Ray.

The ``fedsr`` root (``shared_models.cli``) names them and imports this module when one of them runs.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from client.sites_report import check_site_folder, print_site_report

check_app = typer.Typer(pretty_exceptions_show_locals=False, add_completion=False)  # locals can hold scan data and paths


@check_app.command("check")
def check(directory: Path = typer.Argument(..., help="A site folder (scans + optional site.toml).")) -> None:
    """List what a site folder holds and every file it cannot use, with the reason.

    Exit code 0: the site is usable; 1: it is not (the reason is printed).
    """
    usable = print_site_report(Console(), check_site_folder(directory))
    raise typer.Exit(0 if usable else 1)
