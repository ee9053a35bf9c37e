"""NIfTI reader (.nii, .nii.gz): reoriented to the closest canonical (RAS+) axis order; the modality, which NIfTI
does not record, from the caller or inferred from the intensities."""

from __future__ import annotations

import logging
import re
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np

from client.data.errors import ScanError
from client.data.volume import Volume, check_voxel_limit, spacing_from_affine

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Hounsfield units counted as air by :func:`infer_modality` (air is -1000 HU; scanners' noise spreads it).
AIR_HU = (-1100.0, -900.0)
#: The share of voxels in :data:`AIR_HU` from which a NIfTI scan without a stated modality is read as CT.
CT_AIR_FRACTION = 0.02
#: A value at or below this (HU: fat, CSF next to it) together with one at or above :data:`CT_TISSUE_HU` says CT.
CT_NEGATIVE_HU = -20.0
#: Soft tissue and above in HU (see :data:`CT_NEGATIVE_HU`).
CT_TISSUE_HU = 100.0
#: A BIDS subject entity, ``sub-<label>`` (label: letters and digits), as a folder name or a file-name prefix.
_BIDS_FOLDER = re.compile(r"sub-[A-Za-z0-9]+")
_BIDS_FILE = re.compile(r"(sub-[A-Za-z0-9]+)(?:_|$)")


def is_nifti(path: str | PathLike[str]) -> bool:
    """True for names ending in .nii or .nii.gz (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | PathLike[str]) -> str:
    """File name without .nii / .nii.gz: ``sub-01.nii.gz`` -> ``sub-01``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def nifti_scan_id(path: str | PathLike[str], site_dir: str | PathLike[str]) -> str:
    """A NIfTI scan's id: its path below ``site_dir`` without the suffix, ``/``-separated (``sub-01/anat/x``)."""
    path = Path(path)
    return (path.relative_to(site_dir).parent / nifti_stem(path)).as_posix()


def bids_subject(scan_id: str) -> str | None:
    """The BIDS subject (``sub-<label>``) of a scan id (a ``/``-separated path without suffix), or None.

    The outermost folder named ``sub-<label>`` wins, else the file name's ``sub-<label>_`` prefix:
    ``sub-01/ses-2/anat/sub-01_ses-2_T1w`` -> ``sub-01``; ``sub-07_T2w`` -> ``sub-07``; ``head1`` -> None.
    (A pattern, not pybids: that library indexes a whole dataset and its JSON sidecars to read one entity.)
    """
    *folders, name = scan_id.split("/")
    for folder in folders:
        if _BIDS_FOLDER.fullmatch(folder):
            return folder
    match = _BIDS_FILE.match(name)
    return match.group(1) if match else None


def read_nifti(
    path: str | PathLike[str],
    modality: str | None = None,
    *,
    allow_2d: bool = False,
    max_voxels: int | None = None,
) -> Volume:
    """Read a NIfTI scan as a :class:`Volume` (float32 (X, Y, Z), scaling applied, RAS+ canonical axes).

    NIfTI records no modality: ``modality`` ("MR" or "CT") comes from the caller (the site's config); None:
    :func:`infer_modality` decides from the intensities, logged as a WARNING naming the file.
    Trailing singleton dimensions (X, Y, Z, 1) are dropped. A 2D image (a spatial size of 1) raises
    :class:`ScanError` unless ``allow_2d``, in which case its single-voxel axis is moved to Z.
    ``max_voxels``: a larger scan raises :class:`ScanError` before its voxels are read (None: no limit).
    Raises :class:`ScanError` for unreadable files, complex or colour voxels and 4D series. The voxels are read
    once into one float32 array: peak memory is that array plus the stored voxels (1.5x it for int16 in .nii.gz;
    a .nii file is memory-mapped).
    """
    path = Path(path)
    try:
        image = nib.load(path)
        shape = _spatial_shape(path, image.shape)
        check_voxel_limit(path, shape, max_voxels)
        if image.get_data_dtype().kind not in "biuf":
            raise ScanError(
                path, f"voxels of type {image.get_data_dtype()} (complex or colour): a greyscale scan is expected",
                "convert it to one greyscale 3D volume, or remove it from the site folder",
            )
        stored = np.asanyarray(image.dataobj.get_unscaled()).reshape(shape)
        scaling = float(image.dataobj.slope), float(image.dataobj.inter)
        array, affine = _canonical_float32(stored, np.asarray(image.affine, dtype=np.float64), *scaling)
        del stored
    except ScanError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib raise many types on damaged or foreign files
        raise ScanError(
            path,
            f"cannot be read as NIfTI ({type(exc).__name__}: {exc})",
            "the file is damaged or not a NIfTI image; re-export it, or remove it from the site folder",
        ) from exc
    if 1 in array.shape:
        if not allow_2d:
            raise ScanError(
                path,
                f"2D image (shape {'x'.join(map(str, image.shape))}) where a 3D volume is expected",
                "stack the slices into one 3D NIfTI, or provide the DICOM series",
            )
        array, affine = _singleton_axis_last(array, affine)
    if modality is None:
        modality = infer_modality(array)
        log.warning(
            "%s: NIfTI records no modality and none was given (site.toml sets none): read as %s (%.1f%% of its voxels are air in "
            "Hounsfield units, %g to %g%s). Set modality = \"CT\" or \"MR\" in the site's site.toml",
            path, modality, 100 * air_fraction(array), *AIR_HU,
            "" if modality == "CT" else ": a CT masked to the body, without air or values below 0 HU, reads as MR too",
        )
    return Volume(
        array=np.ascontiguousarray(array),
        spacing=spacing_from_affine(affine),
        affine=affine,
        modality=modality,
        source=str(path),
        subject=nifti_stem(path),
    )


def air_fraction(array: np.ndarray) -> float:
    """The share of voxels within :data:`AIR_HU` (air in Hounsfield units)."""
    return float(np.count_nonzero((array >= AIR_HU[0]) & (array <= AIR_HU[1]))) / max(array.size, 1)


def infer_modality(array: np.ndarray) -> str:
    """A scan's modality from its intensities: "CT" when at least :data:`CT_AIR_FRACTION` of its voxels are air in
    Hounsfield units (:data:`AIR_HU`: the air around the body and in the airways of any CT not masked to the
    body), or when it holds values of :data:`CT_NEGATIVE_HU` and below beside soft tissue of
    :data:`CT_TISSUE_HU` and above (a CT masked to the body keeps its fat and CSF below 0 HU; MR magnitude images
    are never negative, and an intensity-standardised MR spans a few units, not a hundred); else "MR"."""
    if air_fraction(array) >= CT_AIR_FRACTION:
        return "CT"
    return "CT" if array.min() <= CT_NEGATIVE_HU and array.max() >= CT_TISSUE_HU else "MR"


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The image's shape as (X, Y, Z): trailing singleton dimensions dropped, 1 and 2 dimensions padded with 1.

    :class:`ScanError` for more than three non-singleton dimensions (a 4D series)."""
    squeezed = list(shape)
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed.pop()
    if len(squeezed) > 3:
        raise ScanError(
            path,
            f"{len(squeezed)}D image of shape {tuple(squeezed)}: one 3D volume per file is expected",
            "split the series into 3D files (e.g. `fslsplit`), or keep only the volume to train on",
        )
    return (*squeezed, *(1,) * (3 - len(squeezed)))


def _canonical_float32(
    stored: np.ndarray, affine: np.ndarray, slope: float, intercept: float
) -> tuple[np.ndarray, np.ndarray]:
    """The stored voxels as float32 ``stored * slope + intercept``, axes permuted and flipped to the closest RAS+
    order, and the matching affine: :func:`nibabel.as_closest_canonical` and nibabel's scaling, done here because
    nibabel scales integers in float64 and reorients in a second copy (peak 3x the float32 volume); one float32
    copy in canonical order, scaled in place, keeps it at the volume plus the stored voxels."""
    orientation = nib.orientations.io_orientation(affine)
    if not np.array_equal(orientation, [[0, 1], [1, 1], [2, 1]]):
        affine = affine @ nib.orientations.inv_ornt_aff(orientation, stored.shape)
        stored = nib.orientations.apply_orientation(stored, orientation)  # a view
    array = np.array(stored, dtype=np.float32, order="C")
    if slope != 1.0:
        array *= np.float32(slope)
    if intercept != 0.0:
        array += np.float32(intercept)
    return array, affine


def _singleton_axis_last(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move the (first) size-1 axis of a (X, Y, Z) array to Z, permuting the affine's columns to match."""
    axis = array.shape.index(1)
    order = [a for a in range(3) if a != axis] + [axis]
    permuted = affine.copy()
    permuted[:, :3] = affine[:, order]
    return np.transpose(array, order), permuted
