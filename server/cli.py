"""The coordinator's command: ``fedsr report RUN_DIR`` rebuilds a run's report from what its folder stores.

The ``fedsr`` root (``shared_models.cli``) names it and imports this module only when it runs. It needs
``pip install fedsr`` only (no simulator): a run made with ``flwr run`` gets its report the same way.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from server.report import write_report
from shared_models.errors import ExplainedError

# One command; the root names it. Locals can hold paths: tracebacks never show them.
report_app = typer.Typer(pretty_exceptions_show_locals=False, add_completion=False)


@report_app.command("report")
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (what fedsr simulate or the ServerApp wrote)."),
) -> None:
    """Rebuild a run folder's report (report.json, report.html) from its stored results.

    Exit code 0: both written (their paths are printed); 2: the folder is not a run folder or a file in it cannot
    be read (the file and what to do are printed).
    """
    console = Console()
    try:
        written = write_report(run_dir)
    except ExplainedError as error:  # the run folder's files (report.json's inputs, the previews the page shows)
        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for path in written:  # one unwrapped line each, to copy
        console.print(str(path), markup=False, highlight=False, soft_wrap=True)
