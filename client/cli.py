"""A hospital's commands (``fedsr sites check``, ``fedsr privacy show|reset``): they need ``pip install fedsr`` only, never the simulator or Ray.

The ``fedsr`` root (``shared_models.cli``) names them and imports this module when one of them runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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


privacy_app = typer.Typer(name="privacy", pretty_exceptions_show_locals=False, add_completion=False,
                          no_args_is_help=True,
                          help="A site's privacy ledger: what differential privacy it has spent, and its reset.")
STATE_DIR_OPTION = typer.Option(None, "--state-dir", help="The site's state folder, when its SuperNode was given "
                                "one (--node-config state-dir=...); default: SITE_DIR/.fedsr-state.")


@privacy_app.command("show")
def privacy_show(site_dir: Path = typer.Argument(..., help="A site folder."),
                 state_dir: Optional[Path] = STATE_DIR_OPTION) -> None:
    """Print the epsilon spent per privacy unit at the site's delta, its budget, and every spend and reset."""
    from client.privacy_cli import show_ledger

    raise typer.Exit(show_ledger(Console(), site_dir, state_dir))


@privacy_app.command("reset")
def privacy_reset(site_dir: Path = typer.Argument(..., help="A site folder."),
                  reason: str = typer.Option(..., "--reason", help="Why (kept in the ledger), e.g. 'new data "
                                             "release 2027-01: none of the earlier patients'."),
                  yes: bool = typer.Option(False, "--yes", help="Confirm: the spent epsilon is forgotten."),
                  state_dir: Optional[Path] = STATE_DIR_OPTION) -> None:
    """Start the site's epsilon from zero (only for data none of whose patients were trained on under the old
    ledger); the history and the reason stay in the ledger."""
    from client.privacy_cli import reset_ledger

    raise typer.Exit(reset_ledger(Console(), site_dir, state_dir, reason, confirmed=yes))
