"""The in-memory scan every reader returns, and the checks a scan must pass before training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike

import numpy as np

from client.data.errors import ScanError
from shared_models.image import MODALITIES

MIN_INPLANE = 16  # voxels: smaller scans cannot feed the SR model's patches
#: The most voxels one scan may have (site.toml ``max_voxels``) unless a site sets its own: a 512 x 512 x 1000 CT
#: (262 million) fits. 300 million voxels are 1.2 GB as float32; a loaded site holds each scan twice (as read and
#: normalised to [0, 1]).
DEFAULT_MAX_VOXELS = 300_000_000


@dataclass(frozen=True, eq=False)
class Volume:
    """One 3D scan.

    ``array``: float32 (X, Y, Z), scanner units (HU for CT, arbitrary for MR); Z is the slice axis.
    ``spacing``: mm between voxel centres along X, Y, Z.
    ``affine``: (4, 4) float64, voxel index (i, j, k, 1) -> world mm, RAS+.
    ``modality``: "MR" or "CT". ``source``: the file; for a DICOM series of several files, the folder holding
    them + "#" + SeriesInstanceUID.
    ``subject``: the scan id: a NIfTI file's stem (in a site: its path below the site folder, no suffix), or
    the SeriesInstanceUID.
    ``patient``: the grouping key of the train/val/test split: every scan of a patient lands in one split.
    For DICOM it is the PatientID, so it never leaves the site and is never logged; "" (the default) means
    the scan is its own patient (``patient`` is then set to ``subject``).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    source: str
    subject: str
    patient: str = ""

    def __post_init__(self) -> None:
        if not self.patient:
            object.__setattr__(self, "patient", self.subject)  # frozen: the one place the default is filled
        if self.array.ndim != 3 or self.array.dtype != np.float32:
            raise ValueError(
                f"{self.source}: array must be float32 (X, Y, Z), not {self.array.dtype} {self.array.shape}"
            )
        if self.affine.shape != (4, 4):
            raise ValueError(f"{self.source}: affine must be (4, 4), got {self.affine.shape}")
        if self.modality not in MODALITIES:
            raise ValueError(f"{self.source}: modality must be one of {MODALITIES}, got {self.modality!r}")


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """mm between voxel centres along each array axis: the lengths of the affine's first three columns."""
    x, y, z = np.linalg.norm(affine[:3, :3], axis=0)
    return float(x), float(y), float(z)


def validate_volume(volume: Volume, min_inplane: int = MIN_INPLANE) -> None:
    """Raise :class:`ScanError` if the scan cannot be trained on.

    Rejects NaN/Inf voxels, a constant volume, non-positive spacing and an in-plane size (X or Y) below
    ``min_inplane`` voxels. A single slice (Z = 1) is allowed.
    """
    array = volume.array
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ScanError(
            volume.source,
            f"{bad} of {array.size} voxels are NaN or infinite",
            "re-export the scan from the scanner or PACS, or remove it from the site folder",
        )
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise ScanError(
            volume.source,
            f"constant volume (every voxel is {lo:g}): there is no image in it",
            "re-export the scan, or remove it from the site folder",
        )
    if min(volume.spacing) <= 0:
        raise ScanError(volume.source, f"voxel spacing {volume.spacing} mm is not positive", "fix the file's header")
    x, y = array.shape[:2]
    if min(x, y) < min_inplane:
        raise ScanError(
            volume.source,
            f"in-plane size {x}x{y} voxels is smaller than the {min_inplane}x{min_inplane} the model needs",
            "use a larger scan, or remove this one from the site folder",
        )


def check_voxel_limit(source: str | PathLike[str], shape: tuple[int, ...], max_voxels: int | None) -> None:
    """Raise :class:`ScanError` when a scan of ``shape`` (read from its header, before its voxels) has more than
    ``max_voxels`` voxels; None: no limit."""
    voxels = math.prod(shape)
    if max_voxels is not None and voxels > max_voxels:
        raise ScanError(
            source,
            f"{' x '.join(map(str, shape))} = {voxels:,} voxels is above the site's limit of {max_voxels:,} "
            f"(max_voxels; reading it would take about {8 * voxels / 2**30:.1f} GiB: the scan and its normalised copy)",
            "raise max_voxels in site.toml if the machine has the memory, or crop or downsample the scan",
        )
