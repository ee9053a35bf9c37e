"""A site folder -> validated scans, normalised to [0, 1], each assigned to train, val or test by patient."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

import numpy as np

from client.data.dicom import read_dicom_files
from client.data.errors import ScanError, SiteError, Skipped
from client.data.files import SITE_CONFIG_NAME, list_scan_files
from client.data.nifti import bids_subject, is_nifti, nifti_scan_id, read_nifti
from client.data.normalise import Normalisation, fit_normalisation
from client.data.siteconfig import SiteConfig, load_site_config
from client.data.split import SPLITS, explicit_split, split_subjects
from client.data.volume import DEFAULT_MAX_VOXELS, Volume, validate_volume
from client.degrade import profile_from_config

__all__ = ["MIN_TEST_SCANS", "Site", "SiteScan", "Skipped", "discover", "load_site"]

log = logging.getLogger(__name__)

#: Test scans a site needs before its test scores get an interval; fewer and :meth:`Site.test_note` says why.
MIN_TEST_SCANS = 3
#: Patients the fraction split needs to hold out a test patient (train and val take one each first).
_MIN_PATIENTS_TO_TEST = 3
_FOLDER_HINT = "check the path (the SuperNode's site-dir node config, or the simulation's sites folder)"


@dataclass
class SiteScan:
    """One usable scan of a site.

    ``volume``: as read (scanner units). ``image``: float32 (X, Y, Z), ``volume.array`` normalised to [0, 1].
    ``split``: "train", "val" or "test".
    """

    volume: Volume
    image: np.ndarray
    normalisation: Normalisation
    split: str


@dataclass
class Site:
    """A loaded site. ``scans`` are in source order; a site with one patient lists its scans twice (train and
    val). Every scan of a patient is in its patient's split."""

    directory: Path
    config: SiteConfig
    scans: list[SiteScan]
    skipped: list[Skipped]

    def split(self, name: str) -> list[SiteScan]:
        """The scans of one split ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: use one of {', '.join(SPLITS)}")
        return [scan for scan in self.scans if scan.split == name]

    def split_counts(self) -> dict[str, dict[str, int]]:
        """{"train" | "val" | "test": {"scans": n, "patients": m}}: counts only, no patient id."""
        counts = {}
        for name in SPLITS:
            scans = self.split(name)
            counts[name] = {"scans": len(scans), "patients": len({scan.volume.patient for scan in scans})}
        return counts

    def test_note(self) -> str | None:
        """Why this site's test scores are missing or have no interval (a line for reports), or None when its
        test split holds at least :data:`MIN_TEST_SCANS` scans."""
        n_test = self.split_counts()["test"]["scans"]
        if n_test >= MIN_TEST_SCANS:
            return None
        if n_test:
            return f"only {n_test} test scan{'s' if n_test > 1 else ''}: an interval needs at least {MIN_TEST_SCANS}"
        patients = len({scan.volume.patient for scan in self.scans})
        if patients < _MIN_PATIENTS_TO_TEST:
            return (
                f"{patients} patient{'s' if patients > 1 else ''}: a site needs at least {_MIN_PATIENTS_TO_TEST} "
                "patients to hold out a test split"
            )
        return "no test scans: the [split] of site.toml holds out no patient for testing"


def discover(
    site_dir: str | PathLike[str],
    modality: str | None = None,
    subject_map: Mapping[str, str] | None = None,
    *,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> tuple[list[Volume], list[Skipped]]:
    """Every usable volume under ``site_dir`` (recursive) and every file or series skipped, with its reason.

    NIfTI files (.nii, .nii.gz) are read as single scans (subject = path below ``site_dir`` without the suffix;
    patient = ``subject_map[subject]``, else the BIDS ``sub-<label>`` of the path, else the subject); a
    ``subject_map`` key naming no NIfTI file is logged as a warning. Every other file is tried as DICOM, grouped
    into series by SeriesInstanceUID (subject = that UID, patient = PatientID, else the UID).
    Hidden files and folders, ``site.toml`` and README* are ignored silently.
    ``modality``: the site's modality (site.toml's); None: that of most DICOM series, else of most NIfTI scans,
    each inferred from its intensities with a warning (:func:`client.data.nifti.infer_modality`). NIfTI scans get
    the site's modality, and scans of another modality are skipped (one site, one modality).
    ``max_voxels``: larger scans are skipped before their voxels are read (None: no limit).
    Volumes failing :func:`client.data.volume.validate_volume`, 2D NIfTI files and repeated subject ids are
    skipped. Raises :class:`SiteError` when ``site_dir`` is not an existing folder.
    """
    directory = _existing_folder(site_dir)
    files = list_scan_files(directory)
    volumes, skipped = read_dicom_files([path for path in files if not is_nifti(path)], max_voxels=max_voxels)
    dicom_modality = _most_common_modality(volumes)
    nifti_volumes, nifti_skipped = _read_nifti_scans(
        directory, [path for path in files if is_nifti(path)], modality or dicom_modality, subject_map or {},
        max_voxels,
    )
    volumes, skipped = volumes + nifti_volumes, skipped + nifti_skipped
    if modality:
        site_modality, stated = modality, f"site.toml declares {modality}"
    elif dicom_modality:
        site_modality, stated = dicom_modality, f"most of the site's DICOM series are {dicom_modality}"
    else:
        site_modality = _most_common_modality(volumes) or "MR"
        stated = f"most of the site's NIfTI scans read as {site_modality}, from their intensities"
    usable: list[Volume] = []
    sources_by_subject: dict[str, str] = {}
    for volume in volumes:
        try:
            validate_volume(volume)
            _check_modality(volume, site_modality, stated)
            _check_new_subject(volume, sources_by_subject)
        except ScanError as error:
            skipped.append(Skipped.from_error(error))
            continue
        usable.append(volume)
    for item in skipped:
        log.info("skipped %s", item)
    return usable, skipped


def _read_nifti_scans(
    directory: Path, paths: list[Path], modality: str | None, subject_map: Mapping[str, str], max_voxels: int | None
) -> tuple[list[Volume], list[Skipped]]:
    """The NIfTI files of a site as volumes with their scan ids and patients (``modality`` None: each inferred)."""
    scans = [(nifti_scan_id(path, directory), path) for path in paths]
    _warn_unmatched_subjects(directory, subject_map, {scan_id for scan_id, _ in scans})
    volumes, skipped = [], []
    for scan_id, path in scans:
        try:
            volume = read_nifti(path, modality, max_voxels=max_voxels)
        except ScanError as error:
            skipped.append(Skipped.from_error(error))
            continue
        patient = subject_map.get(scan_id) or bids_subject(scan_id) or scan_id
        volumes.append(replace(volume, subject=scan_id, patient=patient))
    return volumes, skipped


def load_site(site_dir: str | PathLike[str]) -> Site:
    """Load a site folder: config, usable scans normalised to [0, 1], split by patient, and what was skipped.

    Raises :class:`SiteError` when the folder is missing, not a folder, empty or has no usable scan, or when
    its site.toml is invalid (a ``[split]`` list naming a scan of a patient instead of the patient included).
    """
    directory = _existing_folder(site_dir)
    config = load_site_config(directory)
    declared = config.modality if config.modality_source == "site.toml" else None
    volumes, skipped = discover(directory, declared, config.subject_map, max_voxels=config.max_voxels)
    if not volumes:
        raise SiteError(directory, *_nothing_usable(skipped))
    if declared is None:  # every usable scan has the site's modality: stated by its DICOM series, else inferred
        from_dicom = any(not is_nifti(volume.source) for volume in volumes)
        config = replace(config, modality=volumes[0].modality, modality_source="dicom" if from_dicom else "intensities")
    _check_acquisition(directory, config)
    parts = _split_patients(directory, config, volumes)
    scans = []
    for volume in volumes:
        normalisation = fit_normalisation(volume, config.ct_window, config.mr_percentiles)
        image = normalisation.apply(volume.array)
        scans.extend(
            SiteScan(volume, image, normalisation, name) for name in SPLITS if volume.patient in parts[name]
        )
    site = Site(directory=directory, config=config, scans=scans, skipped=skipped)
    log.info(
        "site %s (%s, %s): %s; %d skipped",
        config.name, directory, config.modality,
        ", ".join(f"{c['scans']} {name} ({c['patients']} patients)" for name, c in site.split_counts().items()),
        len(skipped),
    )
    return site


def _split_patients(directory: Path, config: SiteConfig, volumes: list[Volume]) -> dict[str, list[str]]:
    """Patient ids by split: site.toml's ``[split]`` lists when given, else its fractions and seed."""
    patients = sorted({volume.patient for volume in volumes})
    if config.split_subjects is None:
        return split_subjects(patients, config.split_fractions, config.split_seed)
    scans_by_id = {volume.subject: volume for volume in volumes}
    for name, listed in config.split_subjects.items():
        for entry in listed:
            volume = scans_by_id.get(entry)
            if entry in patients or volume is None:
                continue
            # A DICOM patient id is the PatientID: messages can leave the site, so it is not written out.
            patient = repr(volume.patient) if is_nifti(volume.source) else "its DICOM PatientID"
            raise SiteError(
                directory / SITE_CONFIG_NAME,
                f"[split] {name} lists the scan {entry!r}, not its patient: the lists name patients (every scan "
                "of a patient goes to its patient's split)",
                f"list {patient} instead of {entry!r}",
            )
    return explicit_split(patients, config.split_subjects)


def _warn_unmatched_subjects(directory: Path, subject_map: Mapping[str, str], scan_ids: set[str]) -> None:
    """Log the ``[subject]`` keys that name no NIfTI scan of the site (a typo, or a scan since removed)."""
    unmatched = sorted(set(subject_map) - scan_ids)
    if unmatched:
        log.warning(
            "%s: [subject] names scans that are not in the site: %s. A key is a NIfTI scan id as `fedsr sites "
            "check` lists it: the path below the site folder, without .nii or .nii.gz",
            directory / SITE_CONFIG_NAME, ", ".join(unmatched),
        )


def _check_acquisition(directory: Path, config: SiteConfig) -> None:
    """site.toml's ``[acquisition]`` must name a profile that fits the site's modality: checked when the site
    loads (so ``fedsr sites check`` reports it), not first when training starts."""
    try:
        profile_from_config(config.acquisition, config.modality)
    except ValueError as error:
        raise SiteError(
            directory / SITE_CONFIG_NAME, f"[acquisition]: {error}", "fix the table (README: acquisition profiles)"
        ) from None


def _existing_folder(site_dir: str | PathLike[str]) -> Path:
    directory = Path(site_dir).expanduser()
    if not directory.exists():
        raise SiteError(directory, "site folder does not exist", _FOLDER_HINT)
    if not directory.is_dir():
        raise SiteError(directory, "is a file, not a site folder", _FOLDER_HINT)
    return directory


def _nothing_usable(skipped: list[Skipped]) -> tuple[str, str]:
    """(problem, hint) for a site without a usable scan."""
    if not skipped:
        return (
            "site folder is empty: no scan files in it or its sub-folders",
            "put NIfTI files (.nii, .nii.gz) or DICOM series (sub-folders allowed) in it, or fix the path",
        )
    examples = "; ".join(str(item) for item in skipped[:3])
    return (
        f"no usable scan: all {len(skipped)} files or series were skipped ({examples})",
        "fix or replace the files listed",
    )


def _most_common_modality(volumes: list[Volume]) -> str | None:
    counts = Counter(volume.modality for volume in volumes)
    return min(counts, key=lambda m: (-counts[m], m)) if counts else None


def _check_modality(volume: Volume, site_modality: str, stated: str) -> None:
    """:class:`ScanError` unless ``volume`` has the site's modality (``stated``: where that comes from)."""
    if volume.modality != site_modality:
        raise ScanError(
            volume.source,
            f"modality {volume.modality} differs from the site's ({stated})",
            "a site holds one modality: move this scan to a site folder of its own"
            + ("" if stated.startswith("site.toml") else ", or set the site's modality in site.toml"),
        )


def _check_new_subject(volume: Volume, sources_by_subject: dict[str, str]) -> None:
    first = sources_by_subject.setdefault(volume.subject, volume.source)
    if first != volume.source:
        raise ScanError(
            volume.source,
            f"subject id {volume.subject!r} is already used by {first}",
            "rename one of the files (each scan needs its own id for the train/val/test split)",
        )
