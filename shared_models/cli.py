"""The ``fedsr`` command: a thin root whose sub-commands belong to the parts.

Each part owns its commands and the root only names them, as ``"module:attribute"`` strings, with their one-line
help. A part's module is imported when one of its commands runs, never to list them: ``fedsr --help`` and
``fedsr sites --help`` import no part, and a hospital's ``fedsr sites check`` imports neither the simulator nor Ray.

- ``fedsr models``: here (``shared_models``); ``pip install fedsr``.
- ``fedsr sites check DIR``: ``client.cli``, a hospital's; ``pip install fedsr``.
- ``fedsr sites make-phantoms DIR``: ``simulation.cli``; ``pip install fedsr``.
- ``fedsr simulate``: ``simulation.cli``; ``pip install "fedsr[simulation]"`` (Flower's simulation engine, Ray).
- ``fedsr privacy show|reset SITE_DIR``: ``client.cli``, a hospital's; ``pip install fedsr``.
- ``fedsr report RUN_DIR``: ``server.cli``, the coordinator's; ``pip install fedsr``.
- ``fedsr deploy ...``: ``deploy.cli``, a real federation (credentials, SuperLink, SuperNodes); ``pip install fedsr``.
- ``fedsr infer MODEL INPUT OUTPUT``: ``client.inference.cli``, a trained model applied to scans; ``pip install fedsr``.

Adding a command is one line in :data:`COMMANDS` or :data:`SITES_COMMANDS` plus the command in its part's module
(a ``typer.Typer`` with that one command, or a ``click.Command``). Entry point: ``fedsr = "shared_models.cli:main"``;
``python -m shared_models.cli`` is the same command.

Tracebacks never show local variables: they can hold scan data and paths.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, NamedTuple

import click
import typer
from typer.core import TyperGroup


class Lazy(NamedTuple):
    """A sub-command owned by a part: where it lives (``"module:attribute"``) and its one-line help."""

    target: str
    short_help: str


#: How the help says to install the simulator (the backslash keeps rich markup from reading "[simulation]" as a style).
SIMULATION_EXTRA_HELP = 'pip install "fedsr\\[simulation]"'

#: Commands under ``fedsr`` that belong to a part (``fedsr models`` and the ``sites`` group are defined here).
COMMANDS: dict[str, Lazy] = {
    "simulate": Lazy(
        "simulation.cli:simulate_app",
        "Run a whole federation on this machine with Flower's simulation engine (needs "
        + SIMULATION_EXTRA_HELP + ").",
    ),
    "report": Lazy("server.cli:report_app",
                   "Rebuild a run folder's report (report.json, report.html) from its stored results."),
    "privacy": Lazy("client.cli:privacy_app",
                    "A site's privacy ledger: the epsilon it has spent (show), and its logged reset."),
    "deploy": Lazy("deploy.cli:deploy_app",
                   "Run a real federation: credentials, SuperLink, registered SuperNodes (Flower)."),
    "infer": Lazy("client.inference.cli:infer_app",
                  "Super-resolve a scan or a folder of scans with a trained model (NIfTI or DICOM, in patient space)."),
}

#: Commands under ``fedsr sites``.
SITES_COMMANDS: dict[str, Lazy] = {
    "check": Lazy("client.cli:check_app", "List what a site folder holds and every file it cannot use, with the reason."),
    "make-phantoms": Lazy(
        "simulation.cli:make_phantoms_app",
        "Write procedural phantom sites (NIfTI + site.toml), each with its own scanner profile.",
    ),
}


def load_command(target: str, name: str) -> click.Command:
    """Import ``"module:attribute"`` and return it as a click command (a ``typer.Typer`` is converted)."""
    module_name, _, attribute = target.partition(":")
    found = getattr(importlib.import_module(module_name), attribute)
    command = typer.main.get_command(found) if isinstance(found, typer.Typer) else found
    if not isinstance(command, click.Command):
        raise TypeError(f"fedsr command {name!r}: {target} is neither a typer.Typer nor a click.Command")
    return command


class LazyGroup(TyperGroup):
    """A command group whose entries in :attr:`lazy` are imported only when they run.

    While the group's help is written, a lazy entry is shown by a stand-in that carries only its name and
    declared one-line help, so listing the commands imports nothing.
    """

    lazy: ClassVar[dict[str, Lazy]] = {}

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._writing_help = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *(name for name in self.lazy if name not in self.commands)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        entry = self.lazy[cmd_name]
        if self._writing_help:
            return click.Command(cmd_name, help=entry.short_help, short_help=entry.short_help)
        return load_command(entry.target, cmd_name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._writing_help = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._writing_help = False

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:  # suggest lazy names too ("Did you mean 'simulate'?")
            if args and "Did you mean" not in error.message:
                import difflib

                matches = difflib.get_close_matches(args[0], self.list_commands(ctx))
                if matches:
                    error.message = error.message.rstrip(".") + ". Did you mean " + ", ".join(map(repr, matches)) + "?"
            raise


class RootGroup(LazyGroup):
    lazy = COMMANDS


class SitesGroup(LazyGroup):
    lazy = SITES_COMMANDS


app = typer.Typer(
    cls=RootGroup,
    help="fedsr: federated super-resolution for medical images.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold scan data and paths: never print them
)
sites_app = typer.Typer(cls=SitesGroup, no_args_is_help=True)
app.add_typer(sites_app, name="sites", help="Site folders: check real ones, make phantom ones.")


@app.command()
def models() -> None:
    """List the model families, their presets, the dimensions they support and their parameter counts."""
    from rich.console import Console
    from rich.table import Table

    from shared_models.catalog import model_catalog

    table = Table(title="fedsr models (parameters for 1 channel, scale 2)")
    for column in ("family", "preset", "spatial dims", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for row in model_catalog():
        preset = row["preset"] or "-"
        table.add_row(row["family"], preset, ", ".join(map(str, row["spatial_dims"])), f"{row['params_2d_x2']:,}")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``fedsr``)."""
    app(args=argv, prog_name="fedsr")


if __name__ == "__main__":
    main()
