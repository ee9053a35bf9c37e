"""DICOM reader: files -> series (by SeriesInstanceUID) -> volumes stacked along the slice normal.

A volume's ``subject`` is its SeriesInstanceUID; its ``patient`` is the PatientID (the series UID when the
tag is absent or empty), so that the site splits by patient. PatientID is never written to a log or a message.

Geometry follows DICOM PS3.3 C.7.6.2.1.1: ImageOrientationPatient gives the direction of a row (increasing
column index) and of a column (increasing row index) in patient LPS; ImagePositionPatient is the centre of the
first pixel; PixelSpacing is (between rows, between columns). Volumes come out as X = column index, Y = row
index, Z = slice index ordered along the slice normal (row x column), with a RAS+ affine (LPS -> RAS flips the
first two world axes). Slices are ordered by position, never by file name or InstanceNumber.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from client.data.errors import ScanError, Skipped
from client.data.files import list_scan_files
from client.data.volume import MODALITIES, Volume, spacing_from_affine

log = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SAME_POSITION_MM = 1e-3  # slices closer than this along the normal are at the same location
_SPACING_RTOL = 0.02  # slice gaps may differ this much (relative) before the series counts as uneven
_DIRECTION_ATOL = 1e-3  # direction cosines that differ less than this are the same orientation
_DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_REEXPORT = "copy it again from the scanner or PACS, or remove it from the site folder"


@dataclass(frozen=True, eq=False)
class _Slice:
    """One 2D image: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int  # frame index within the file (0 for single-frame files)
    series_uid: str
    patient_id: str  # PatientID, stripped; "" when absent or empty
    instance_uid: str  # SOPInstanceUID, or the path when the file has none
    modality: str
    pixels: np.ndarray  # float32 (Rows, Columns), rescaled to scanner units
    position: np.ndarray | None  # (3,) LPS mm of the first pixel's centre; None when the file has no geometry
    row_dir: np.ndarray  # (3,) LPS unit vector along a row (increasing column index)
    col_dir: np.ndarray  # (3,) LPS unit vector down a column (increasing row index)
    pixel_spacing: tuple[float, float]  # mm between rows, between columns
    thickness: float | None  # mm: SliceThickness, else SpacingBetweenSlices (the Z size of a lone slice)


def read_dicom_folder(folder: str | PathLike[str]) -> tuple[list[Volume], list[Skipped]]:
    """Read every DICOM series under ``folder`` (recursive; hidden files, ``site.toml`` and README* ignored).

    Returns the volumes (one per SeriesInstanceUID) and the files or series that could not be used, each with
    its reason. Raises :class:`ScanError` when ``folder`` is not an existing folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ScanError(folder, "is not an existing folder", "check the path")
    return read_dicom_files(list_scan_files(folder))


def read_dicom_files(paths: Iterable[str | PathLike[str]]) -> tuple[list[Volume], list[Skipped]]:
    """Read DICOM files, group them by SeriesInstanceUID (whatever folders they are in), stack each series.

    A series of one single-frame file is a valid one-slice volume (Z = 1, Z spacing = SliceThickness).
    Corrupt, truncated, non-DICOM and non-image files, and series that cannot be stacked (mixed sizes or
    orientations, several images per position, missing slices), come back as :class:`Skipped`.
    """
    series: dict[str, list[_Slice]] = {}
    skipped: list[Skipped] = []
    for path in paths:
        try:
            slices = _read_file(Path(path))
        except ScanError as error:
            skipped.append(Skipped.from_error(error))
            continue
        for item in slices:
            series.setdefault(item.series_uid, []).append(item)
    volumes = []
    for uid, slices in series.items():
        unique, duplicates = _drop_duplicates(slices)
        skipped.extend(duplicates)
        try:
            volumes.append(_stack(uid, unique))
        except ScanError as error:
            skipped.append(Skipped.from_error(error))
    return volumes, skipped


# ----------------------------------------------------------------------------------------------- one file


def _read_file(path: Path) -> list[_Slice]:
    """The images of one DICOM file (one per frame). Raises :class:`ScanError` when it holds none usable."""
    ds = _read_dataset(path)
    if "PixelData" not in ds:
        raise ScanError(path, *_no_pixels_problem(ds))
    modality = str(ds.get("Modality", "")).upper()
    if modality not in MODALITIES:
        raise ScanError(
            path,
            f"modality {modality or '(missing)'} is not supported: only {' and '.join(MODALITIES)} images are used",
            "remove it from the site folder",
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ScanError(
            path,
            f"colour image ({ds.get('PhotometricInterpretation', '?')}), not a greyscale CT/MR image",
            "remove it from the site folder",
        )
    frames = _decode(path, ds)
    row_dir, col_dir, has_orientation = _orientation(ds)
    positions = _frame_positions(path, ds, len(frames), np.cross(row_dir, col_dir))
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    if not series_uid:
        series_uid = f"{path.parent}#no-SeriesInstanceUID"
        log.warning("%s has no SeriesInstanceUID: grouped with the other such files of its folder", path)
    return [
        _Slice(
            path=path,
            frame=k,
            series_uid=series_uid,
            patient_id=str(ds.get("PatientID", "") or "").strip(),
            instance_uid=str(ds.get("SOPInstanceUID", "")) or str(path),
            modality=modality,
            pixels=_rescaled(ds, k, frame),
            position=positions[k] if has_orientation else None,
            row_dir=row_dir,
            col_dir=col_dir,
            pixel_spacing=_pixel_spacing(path, ds, k),
            thickness=_number(_frame_value(ds, k, "PixelMeasuresSequence", "SliceThickness"))
            or _number(_frame_value(ds, k, "PixelMeasuresSequence", "SpacingBetweenSlices")),
        )
        for k, frame in enumerate(frames)
    ]


def _read_dataset(path: Path) -> Dataset:
    """Parse a file as DICOM, also accepting files without the 128-byte preamble if they hold an image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each odd element of a damaged file; the error says it
        try:
            return pydicom.dcmread(path)
        except InvalidDicomError:
            pass
        except OSError as exc:
            raise ScanError(path, f"cannot be opened ({type(exc).__name__}: {exc})", "check its permissions") from exc
        except Exception as exc:  # pydicom raises many types on damaged files
            raise ScanError(path, f"damaged DICOM file ({type(exc).__name__}: {exc})", _REEXPORT) from exc
        if _starts_like_raw_dicom(path):
            try:
                ds = pydicom.dcmread(path, force=True)
            except Exception:  # a damaged or foreign file: reported below as not DICOM
                ds = None
            if ds is not None and "PixelData" in ds and "Rows" in ds:
                return ds
    raise ScanError(
        path,
        "neither a DICOM file nor a NIfTI file (.nii, .nii.gz)",
        "remove it from the site folder (or convert it to NIfTI)",
    )


def _starts_like_raw_dicom(path: Path) -> bool:
    """A DICOM file without preamble starts with a group 0x0002 or 0x0008 tag (little endian)."""
    with open(path, "rb") as handle:
        return handle.read(2) in (b"\x02\x00", b"\x08\x00")


def _no_pixels_problem(ds: Dataset) -> tuple[str, str]:
    """(problem, hint) for a DICOM file without pixel data: truncated image, or not an image at all."""
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    name = getattr(sop_class, "name", "") or "no SOP class"
    if "Image" in name:
        return f"{name} file without pixel data: the file is truncated or incomplete", _REEXPORT
    return (
        f"DICOM file without image data ({name}): a report, index (DICOMDIR), or a truncated file",
        "remove it from the site folder if it is not an image; otherwise copy it again",
    )


def _decode(path: Path, ds: Dataset) -> np.ndarray:
    """Stored pixel values as (frames, Rows, Columns)."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom's decoders raise many types on truncated or unsupported data
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is not None and syntax.is_compressed:
            hint = (
                f"it is compressed ({syntax.name}): if no codec for it is installed, install pylibjpeg / "
                "python-gdcm or re-export it uncompressed; otherwise it is damaged, copy it again"
            )
        else:
            hint = "the file is truncated or damaged: " + _REEXPORT
        raise ScanError(path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})", hint) from exc
    return pixels.reshape(-1, int(ds.Rows), int(ds.Columns))


def _rescaled(ds: Dataset, frame: int, stored: np.ndarray) -> np.ndarray:
    """Stored values -> scanner units (HU for CT): stored * RescaleSlope + RescaleIntercept, float32."""
    slope = _number(_frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"), 1.0)
    intercept = _number(_frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"), 0.0)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


# ------------------------------------------------------------------------------------------- geometry


def _frame_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """An attribute of one frame: the per-frame functional group's, else the shared group's, else top level.

    Enhanced multi-frame files keep geometry and rescale in functional groups; classic files at top level.
    Returns None when absent or empty.
    """
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and items[0].get(keyword) not in (None, ""):
            return items[0].get(keyword)
    value = ds.get(keyword)
    return None if value is None or value == "" else value


def _number(value: Any, default: float | None = None) -> float | None:
    return default if value is None else float(value)


def _vector(value: Any) -> np.ndarray:
    return np.array([float(v) for v in value], dtype=np.float64)


def _orientation(ds: Dataset) -> tuple[np.ndarray, np.ndarray, bool]:
    """(row direction, column direction, whether the file states them); unit LPS vectors, from frame 0."""
    value = _frame_value(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    cosines = _vector(value if value is not None else _DEFAULT_ORIENTATION)
    row_dir, col_dir = cosines[:3], cosines[3:]
    return row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir), value is not None


def _frame_positions(path: Path, ds: Dataset, n_frames: int, normal: np.ndarray) -> list[np.ndarray | None]:
    """ImagePositionPatient (LPS mm) of each frame; None for a single frame without one.

    Multi-frame files need per-frame positions (enhanced files), or a first position plus
    SpacingBetweenSlices (classic multi-frame volumes); otherwise :class:`ScanError` (cine, time series).
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if n_frames > 1 and len(per_frame) >= n_frames and all("PlanePositionSequence" in g for g in per_frame):
        return [_vector(_frame_value(ds, k, "PlanePositionSequence", "ImagePositionPatient")) for k in range(n_frames)]
    first = _frame_value(ds, 0, "PlanePositionSequence", "ImagePositionPatient")
    if n_frames == 1:
        return [None if first is None else _vector(first)]
    step = _number(_frame_value(ds, 0, "PixelMeasuresSequence", "SpacingBetweenSlices"))
    if first is None or not step:
        raise ScanError(
            path,
            f"multi-frame file ({n_frames} frames) without per-frame positions or SpacingBetweenSlices: the frames "
            "cannot be placed in space (a cine or time series is not a volume)",
            "export the volume as one file per slice, or as an enhanced multi-frame file with per-frame positions",
        )
    return [_vector(first) + k * step * normal for k in range(n_frames)]


def _pixel_spacing(path: Path, ds: Dataset, frame: int) -> tuple[float, float]:
    """(between rows, between columns) in mm."""
    value = _frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not value or len(value) != 2 or min(float(v) for v in value) <= 0:
        raise ScanError(path, f"no valid PixelSpacing ({value!r}): the voxel size is unknown", _REEXPORT)
    return float(value[0]), float(value[1])


# ---------------------------------------------------------------------------------------------- series


def _drop_duplicates(slices: list[_Slice]) -> tuple[list[_Slice], list[Skipped]]:
    """Keep the first copy of each (SOPInstanceUID, frame); every other file holding a copy is Skipped once."""
    first_seen: dict[tuple[str, int], Path] = {}
    unique, duplicate_files = [], {}
    for item in slices:
        key = (item.instance_uid, item.frame)
        if key in first_seen:
            duplicate_files.setdefault(item.path, first_seen[key])
        else:
            first_seen[key] = item.path
            unique.append(item)
    unique = [item for item in unique if item.path not in duplicate_files]
    skipped = [
        Skipped(str(path), f"duplicate of {original} (same SOPInstanceUID): ignored. Remove one of the copies")
        for path, original in duplicate_files.items()
    ]
    return unique, skipped


def _series_source(uid: str, slices: list[_Slice]) -> str:
    """The file, for a one-file series; else the folder holding its files + '#' + SeriesInstanceUID."""
    files = sorted({str(item.path) for item in slices})
    return files[0] if len(files) == 1 else f"{os.path.commonpath(files)}#{uid}"


def _mismatch(a: _Slice, b: _Slice) -> str | None:
    """How two images of one series differ in a way that forbids stacking them, or None."""
    if a.pixels.shape != b.pixels.shape:
        return f"image size ({a.pixels.shape[0]}x{a.pixels.shape[1]} and {b.pixels.shape[0]}x{b.pixels.shape[1]})"
    if not np.allclose(a.pixel_spacing, b.pixel_spacing, rtol=1e-3):
        return f"pixel spacing ({a.pixel_spacing} and {b.pixel_spacing} mm)"
    same_rows = np.allclose(a.row_dir, b.row_dir, atol=_DIRECTION_ATOL)
    if not (same_rows and np.allclose(a.col_dir, b.col_dir, atol=_DIRECTION_ATOL)):
        return "orientation (ImageOrientationPatient)"
    if a.modality != b.modality:
        return f"modality ({a.modality} and {b.modality})"
    if a.patient_id != b.patient_id:
        return "PatientID (values not shown: they identify patients)"
    return None


def _stack(uid: str, slices: list[_Slice]) -> Volume:
    """Stack one series' images along the slice normal into a :class:`Volume` (X = columns, Y = rows)."""
    source = _series_source(uid, slices)
    first = slices[0]
    for other in slices[1:]:
        difference = _mismatch(first, other)
        if difference:
            raise ScanError(
                source,
                f"mixed series: its images differ in {difference}, e.g. {first.path} and {other.path}",
                "export each acquisition as its own series (distinct SeriesInstanceUID), or remove the odd images "
                "(e.g. localisers)",
            )
    normal = np.cross(first.row_dir, first.col_dir)
    if len(slices) == 1:
        slice_vector = normal * _lone_slice_thickness(first)
        origin = first.position if first.position is not None else np.zeros(3)
        if first.position is None:
            log.warning("%s has no ImagePositionPatient/ImageOrientationPatient: identity geometry assumed", source)
    else:
        slices = _sorted_along(source, slices, normal)
        origin = slices[0].position
        slice_vector = (slices[-1].position - origin) / (len(slices) - 1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = first.row_dir * first.pixel_spacing[1]
    affine_lps[:3, 1] = first.col_dir * first.pixel_spacing[0]
    affine_lps[:3, 2] = slice_vector
    affine_lps[:3, 3] = origin
    affine = _LPS_TO_RAS @ affine_lps
    return Volume(
        array=np.stack([item.pixels.T for item in slices], axis=-1),
        spacing=spacing_from_affine(affine),
        affine=affine,
        modality=first.modality,
        source=source,
        subject=uid,
        patient=first.patient_id or uid,
    )


def _lone_slice_thickness(item: _Slice) -> float:
    if item.thickness:
        return item.thickness
    log.warning("%s has no SliceThickness or SpacingBetweenSlices: 1 mm assumed", item.path)
    return 1.0


def _sorted_along(source: str, slices: list[_Slice], normal: np.ndarray) -> list[_Slice]:
    """Slices ordered by position along ``normal``; :class:`ScanError` unless evenly spaced and distinct."""
    unplaced = [item for item in slices if item.position is None]
    if unplaced:
        raise ScanError(
            source,
            f"{len(unplaced)} of its {len(slices)} images have no ImagePositionPatient/ImageOrientationPatient "
            f"(e.g. {unplaced[0].path}): the slices cannot be ordered",
            "export the series with its geometry, or remove the images that lack it",
        )
    depth = np.array([item.position @ normal for item in slices])
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    gaps = np.diff(depth)
    shared = int(np.count_nonzero(gaps < _SAME_POSITION_MM))
    if shared:
        raise ScanError(
            source,
            f"{shared} of its {len(slices)} images repeat another image's slice position: the series holds several "
            "images per location (echoes, phases, repeats, or a second stack)",
            "export one echo / phase / stack per series",
        )
    step = float(np.median(gaps))
    if not np.allclose(gaps, step, rtol=_SPACING_RTOL, atol=0.01):
        raise ScanError(
            source,
            f"uneven slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm between neighbours): slices are missing "
            "or the series mixes stacks",
            "copy the complete series again (files skipped for other reasons may be its missing slices)",
        )
    return [slices[i] for i in order]
