"""What ``fedsr infer`` reads: a NIfTI file or one DICOM series, found in a folder and read once.

The readers are the sites' own (:func:`client.data.nifti.read_nifti`, :func:`client.data.dicom.read_dicom_files`),
so a scan is oriented, stacked and rescaled to scanner units exactly as in training. A folder is split into scans
by file: each NIfTI file is one, the other files are grouped by their SeriesInstanceUID (headers only; the pixels
are read when the scan's turn comes), and files that hold none (not DICOM, or damaged) form one group per folder
that the DICOM reader then reports file by file.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from client.data.dicom import read_dicom_files
from client.data.files import list_scan_files
from client.data.nifti import is_nifti, nifti_stem, read_nifti
from client.data.volume import Volume, validate_volume
from client.inference.errors import InferenceError

#: Name of the group of files in a folder that carry no SeriesInstanceUID (not DICOM, or damaged).
NO_SERIES = "no-series-uid"
_SLAB = 16  # slices per step when scanning a volume's values


@dataclass(frozen=True)
class ScanSource:
    """One scan to read. ``kind``: "nifti" (one file) or "dicom" (the files of one series). ``name``: where its
    output goes below a batch's output folder (``sub-01/anat/T1w``, ``patient3/ct``), no suffix."""

    kind: str
    files: tuple[Path, ...]
    name: str

    @property
    def location(self) -> str:
        """The file, or the folder holding the series' files, for messages."""
        if len(self.files) == 1:
            return str(self.files[0])
        return os.path.commonpath([str(f) for f in self.files])


@dataclass(frozen=True, eq=False)
class InputScan:
    """A scan as read. ``volume``: float32 (X, Y, Z) in scanner units, RAS+ affine. ``header``: the first DICOM
    file's attributes without pixel data (None for NIfTI). ``thickness``: mm, the series' SliceThickness, else the
    slice spacing. ``xform_code``: a NIfTI input's sform (else qform) code, 1 (scanner) for DICOM. ``integral``:
    every voxel a whole number. ``value_range``: (min, max) of the voxels. ``notes``: files of the series the
    reader left out, with the reason."""

    source: ScanSource
    volume: Volume
    header: Dataset | None
    thickness: float
    xform_code: int
    integral: bool
    value_range: tuple[float, float]
    notes: tuple[str, ...] = ()


def list_scans(folder: Path) -> list[ScanSource]:
    """Every scan under ``folder`` (recursive; hidden files, ``site.toml`` and README* ignored), sorted by name."""
    nifti, series = [], {}
    for path in list_scan_files(folder):
        if is_nifti(path):
            nifti.append(ScanSource("nifti", (path,), (path.relative_to(folder).parent / nifti_stem(path)).as_posix()))
        else:
            series.setdefault((path.parent, _series_uid(path)), []).append(path)
    per_folder = Counter(parent for parent, _ in series)
    dicom = []
    for (parent, uid), files in series.items():
        relative = parent.relative_to(folder).as_posix()
        name = relative if per_folder[parent] == 1 and relative != "." else f"{relative}/{uid or NO_SERIES}"
        dicom.append(ScanSource("dicom", tuple(files), name.removeprefix("./")))
    return sorted(nifti + dicom, key=lambda source: source.name)


def single_source(path: Path) -> ScanSource | None:
    """The one scan ``path`` names (a NIfTI file, a DICOM file, or a folder holding exactly one DICOM series and
    nothing else), or None for a folder of several scans (batch mode)."""
    if not path.exists():
        raise InferenceError(path, "does not exist", "check the path")
    if path.is_file():
        return ScanSource("nifti" if is_nifti(path) else "dicom", (path,), nifti_stem(path))
    sources = list_scans(path)
    if len(sources) == 1 and sources[0].kind == "dicom":
        return ScanSource("dicom", sources[0].files, path.name)
    return None


def read_scan(source: ScanSource, nifti_modality: str) -> InputScan:
    """Read one scan; ``nifti_modality`` ("MR" or "CT") for a NIfTI file, which records none.

    Raises ``ScanError`` (unreadable, or unusable: NaN voxels, constant, smaller than 16 x 16 in-plane) or
    :class:`InferenceError` (no usable DICOM series among the files).
    """
    if source.kind == "nifti":
        volume = read_nifti(source.files[0], nifti_modality, allow_2d=True)
        header, notes, code = None, (), _nifti_code(source.files[0])
    else:
        volumes, skipped = read_dicom_files(source.files)
        if len(volumes) != 1:
            found = "no usable series" if not volumes else f"{len(volumes)} series"
            reasons = "; ".join(str(item) for item in skipped[:3]) or "see the files"
            raise InferenceError(source.location, f"holds {found} ({reasons})", "give the folder of one series")
        volume, notes, code = volumes[0], tuple(str(item) for item in skipped), 1
        header = _header(volume, source.files)
    validate_volume(volume)
    thickness = float(header.get("SliceThickness") or 0.0) if header is not None else 0.0
    value_range = (float(volume.array.min()), float(volume.array.max()))
    return InputScan(source, volume, header, thickness or volume.spacing[2], code, _integral(volume.array),
                     value_range, notes)


def _series_uid(path: Path) -> str:
    """A file's SeriesInstanceUID from its header alone; "" for a file that holds none (or is not DICOM)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SeriesInstanceUID"])
        return str(ds.get("SeriesInstanceUID", "") or "")
    except Exception:  # pydicom raises many types on foreign or damaged files; the reader explains them later
        return ""


def _header(volume: Volume, files: tuple[Path, ...]) -> Dataset:
    """The attributes (no pixel data) of the first file of the series the reader stacked from ``files``."""
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a damaged file's odd elements: the reader has reported it
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # a file the reader skipped for being damaged
            continue
        if str(ds.get("Modality", "")).upper() == volume.modality:
            return ds
    raise InferenceError(volume.source, "no file of the series can be read again", "check that it is not being changed")


def _nifti_code(path: Path) -> int:
    """The file's sform code, else its qform code, else 1 (scanner coordinates)."""
    header = nib.load(path).header
    return int(header["sform_code"]) or int(header["qform_code"]) or 1


def _integral(array: np.ndarray) -> bool:
    """Every value a whole number, checked slab by slab (no full-size temporary)."""
    return all(np.array_equal(block, np.round(block)) for block in
               (array[:, :, z : z + _SLAB] for z in range(0, array.shape[2], _SLAB)))


def integer_type(integral: bool, lo: float, hi: float) -> np.dtype | None:
    """int16 or uint16 when every value in [lo, hi] is a whole number that fits; None otherwise."""
    if not integral:
        return None
    for dtype in (np.int16, np.uint16):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    return None
