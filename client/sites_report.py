"""``fedsr sites check`` (a hospital's command, ``client.cli``): what a site folder holds, and every file it cannot
use with the reason. The simulator prints the brief form for each of its sites."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.data.errors import SiteError, Skipped
from client.data.nifti import is_nifti
from client.data.site import Site, load_site
from client.data.siteconfig import SitePolicy

#: After the modality of a site of NIfTI scans whose site.toml names none (each scan's read from its voxels).
_INFERRED = " [yellow](inferred from the scans' intensities: set modality in site.toml)[/]"


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
    """Print the report (``brief``: one line, the test note, the skipped files). Returns whether the site is usable.

    The head line gives scans and patients per split; the table names each scan's patient, except a DICOM
    patient, which is numbered (its id is the PatientID, which this output does not show).
    """
    if report.site is None:
        console.print(f"[red]unusable site[/]: {escape(str(report.error))}", highlight=False)
        return False
    site, config = report.site, report.site.config
    head = (
        f"site [bold]{escape(config.name)}[/] ({escape(str(report.directory))}): {config.modality}"
        f"{_INFERRED if config.modality_source == 'intensities' else ''}"
        f"{', ' + escape(config.scanner) if config.scanner else ''}; "
        + "scans (patients): "
        + ", ".join(f"{c['scans']} ({c['patients']}) {name}" for name, c in site.split_counts().items())
        + f"; {len(report.skipped)} skipped"
    )
    console.print(head)
    note = site.test_note()
    if note:
        console.print(f"  [yellow]test split[/]: {escape(note)}", highlight=False)
    if not brief:
        patients = _patient_labels(site)
        table = Table(title=f"scans of {escape(config.name)}")
        for column in ("subject", "patient", "split", "shape (X, Y, Z)", "spacing mm", "modality", "source"):
            # long subjects, patients, paths and series UIDs wrap, never cut; the short columns stay whole
            wraps = column in ("subject", "patient", "source")
            table.add_column(column, overflow="fold" if wraps else "ellipsis", no_wrap=not wraps)
        for scan in site.scans:
            volume = scan.volume
            table.add_row(
                escape(volume.subject), escape(patients[volume.patient]), scan.split,
                " x ".join(map(str, volume.array.shape)),
                " x ".join(f"{s:.3g}" for s in volume.spacing), volume.modality,
                escape(_relative(volume.source, report.directory)),
            )
        console.print(table)
        acquisition = config.acquisition or {"profile": "(modality default)"}
        console.print(
            f"acquisition profile: {escape(str(acquisition))}; split seed {config.split_seed}; may share its local "
            f"model: {_yes(config.share_local_model)}, test previews: {_yes(config.share_previews)}; scans above "
            f"{config.max_voxels:,} voxels are skipped unread (max_voxels)"
        )
        console.print(f"policy (what it accepts from the coordinator): {escape(policy_text(config.policy))}")
        privacy = config.privacy
        budget = "none" if privacy.epsilon_budget is None else f"epsilon {privacy.epsilon_budget:g} per patient"
        console.print(f"differential privacy required: {_yes(privacy.dp_required)}; budget: {budget} at delta "
                      f"{privacy.delta:g} (spent so far: fedsr privacy show)")
    for item in report.skipped:
        console.print(f"  [yellow]skipped[/] {escape(item.path)}: {escape(item.reason)}", highlight=False)
    return True


def _patient_labels(site: Site) -> dict[str, str]:
    """Patient id -> what the table shows: the id where a NIfTI scan's path or site.toml gave it, else
    "DICOM patient <k>" (k numbers the site's other patients in scan order)."""
    named = {scan.volume.patient for scan in site.scans if is_nifti(scan.volume.source)}
    labels: dict[str, str] = {}
    for patient in dict.fromkeys(scan.volume.patient for scan in site.scans):
        labels[patient] = patient if patient in named else f"DICOM patient {len(labels.keys() - named) + 1}"
    return labels


def policy_text(policy: SitePolicy) -> str:
    """A site's ``[policy]`` in one line: ``batch-size >= 8, local-steps >= 10, num-rounds <= 200, models: any,
    losses: any`` (the coordinator's setting names)."""
    def names(allowed: tuple[str, ...] | None) -> str:
        return "any" if allowed is None else ", ".join(allowed)

    return (f"batch-size >= {policy.min_batch_size}, local-steps >= {policy.min_local_steps}, num-rounds <= "
            f"{policy.max_rounds}, models: {names(policy.allowed_models)}, losses: {names(policy.allowed_losses)}")


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _relative(source: str, directory: Path) -> str:
    """A scan's source (a file, or ``folder#SeriesInstanceUID``) relative to its site folder where it lies inside."""
    try:
        return str(Path(source).relative_to(Path(directory)))
    except ValueError:
        return source
