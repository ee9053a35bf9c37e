"""``fedsr sites check`` (a hospital's command, ``client.cli``): what a site folder holds, and every file it cannot
use with the reason. The simulator prints the brief form for each of its sites."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
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
        console.print(f"[red]unusable site[/]: {escape(str(report.error))}", highlight=False)
        return False
    site, config = report.site, report.site.config
    counts = {name: len(site.split(name)) for name in ("train", "val", "test")}
    head = (
        f"site [bold]{escape(config.name)}[/] ({escape(str(report.directory))}): {config.modality}"
        f"{', ' + escape(config.scanner) if config.scanner else ''}; "
        + ", ".join(f"{n} {name}" for name, n in counts.items())
        + f"; {len(report.skipped)} skipped"
    )
    console.print(head)
    if not brief:
        table = Table(title=f"scans of {escape(config.name)}")
        for column in ("subject", "split", "shape (X, Y, Z)", "spacing mm", "modality", "source"):
            # long subjects, paths and series UIDs wrap, never cut; the short columns stay whole
            wraps = column in ("subject", "source")
            table.add_column(column, overflow="fold" if wraps else "ellipsis", no_wrap=not wraps)
        for scan in site.scans:
            volume = scan.volume
            table.add_row(
                escape(volume.subject), scan.split, " x ".join(map(str, volume.array.shape)),
                " x ".join(f"{s:.3g}" for s in volume.spacing), volume.modality,
                escape(_relative(volume.source, report.directory)),
            )
        console.print(table)
        acquisition = config.acquisition or {"profile": "(modality default)"}
        console.print(f"acquisition profile: {escape(str(acquisition))}; split seed {config.split_seed}")
    for item in report.skipped:
        console.print(f"  [yellow]skipped[/] {escape(item.path)}: {escape(item.reason)}", highlight=False)
    return True


def _relative(source: str, directory: Path) -> str:
    """A scan's source (a file, or ``folder#SeriesInstanceUID``) relative to its site folder where it lies inside."""
    try:
        return str(Path(source).relative_to(Path(directory)))
    except ValueError:
        return source
