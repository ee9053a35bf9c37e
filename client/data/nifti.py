"""NIfTI reader (.nii, .nii.gz): reoriented to the closest canonical (RAS+) axis order."""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np

from client.data.errors import ScanError
from client.data.volume import Volume, spacing_from_affine

NIFTI_SUFFIXES = (".nii.gz", ".nii")
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


def read_nifti(path: str | PathLike[str], modality: str = "MR", *, allow_2d: bool = False) -> Volume:
    """Read a NIfTI scan as a :class:`Volume` (float32 (X, Y, Z), scaling applied, RAS+ canonical axes).

    NIfTI records no modality: ``modality`` ("MR" or "CT") comes from the caller (the site's config).
    Trailing singleton dimensions (X, Y, Z, 1) are dropped. A 2D image (a spatial size of 1) raises
    :class:`ScanError` unless ``allow_2d``, in which case its single-voxel axis is moved to Z.
    Raises :class:`ScanError` for unreadable files and 4D series.
    """
    path = Path(path)
    try:
        image = nib.funcs.squeeze_image(nib.load(path))
        if image.ndim > 3:
            raise ScanError(
                path,
                f"{image.ndim}D image of shape {image.shape}: one 3D volume per file is expected",
                "split the series into 3D files (e.g. `fslsplit`), or keep only the volume to train on",
            )
        image = nib.as_closest_canonical(image)
        array = image.get_fdata(dtype=np.float32)
    except ScanError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib raise many types on damaged or foreign files
        raise ScanError(
            path,
            f"cannot be read as NIfTI ({type(exc).__name__}: {exc})",
            "the file is damaged or not a NIfTI image; re-export it, or remove it from the site folder",
        ) from exc
    affine = np.asarray(image.affine, dtype=np.float64)
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if 1 in array.shape:
        if not allow_2d:
            raise ScanError(
                path,
                f"2D image (shape {'x'.join(map(str, image.shape))}) where a 3D volume is expected",
                "stack the slices into one 3D NIfTI, or provide the DICOM series",
            )
        array, affine = _singleton_axis_last(array, affine)
    return Volume(
        array=np.ascontiguousarray(array),
        spacing=spacing_from_affine(affine),
        affine=affine,
        modality=modality,
        source=str(path),
        subject=nifti_stem(path),
    )


def _singleton_axis_last(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move the (first) size-1 axis of a (X, Y, Z) array to Z, permuting the affine's columns to match."""
    axis = array.shape.index(1)
    order = [a for a in range(3) if a != axis] + [axis]
    permuted = affine.copy()
    permuted[:, :3] = affine[:, order]
    return np.transpose(array, order), permuted
