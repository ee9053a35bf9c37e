"""``fedsr sites check``: what a site folder holds, and every file it cannot use with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from client.data.errors import SiteError, Skipped
from client.data.site import Site, load_site


@dataclass(frozen=True)
class SiteReport:
    """A site folder as the ClientApp would see it: the loaded site, or the error that stops it."""

    directory: Path
    site: Site | None
    error: SiteError | None
    skipped: tuple[Skipped, ...]


def check_site_folder(directory: Path) -> SiteReport:
    """Load the folder exactly as a site does; never raises for bad data."""
    try:
        site = load_site(directory)
    except SiteError as error:
        return SiteReport(directory, None, error, ())
    return SiteReport(directory, site, None, tuple(site.skipped))


def print_site_report(console: Console, report: SiteReport, brief: bool = False) -> bool:
    """Print the report (``brief``: one line plus the skipped files). Returns whether the site is usable."""
    if report.site is None:
        console.print(f"[red]site {report.directory}: unusable[/]: {report.error}")
        return False
    site, config = report.site, report.site.config
    counts = {name: len(site.split(name)) for name in ("train", "val", "test")}
    head = (
        f"site [bold]{config.name}[/] ({report.directory}): {config.modality}"
        f"{', ' + config.scanner if config.scanner else ''}; "
        + ", ".join(f"{n} {name}" for name, n in counts.items())
        + f"; {len(report.skipped)} skipped"
    )
    console.print(head)
    if not brief:
        table = Table(title=f"scans of {config.name}")
        for column in ("subject", "split", "shape (X, Y, Z)", "spacing mm", "modality", "source"):
            table.add_column(column)
        for scan in site.scans:
            volume = scan.volume
            table.add_row(
                volume.subject, scan.split, " x ".join(map(str, volume.array.shape)),
                " x ".join(f"{s:.3g}" for s in volume.spacing), volume.modality, volume.source,
            )
        console.print(table)
        acquisition = config.acquisition or {"profile": "(modality default)"}
        console.print(f"acquisition profile: {acquisition}; split seed {config.split_seed}")
    for item in report.skipped:
        console.print(f"  [yellow]skipped[/] {item.path}: {item.reason}", highlight=False)
    return True
