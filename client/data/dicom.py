"""DICOM reader: files -> series (by SeriesInstanceUID) -> volumes stacked along the slice normal.

A volume's ``subject`` is its SeriesInstanceUID; its ``patient`` is the PatientID (the series UID when the
tag is absent or empty), so that the site splits by patient. PatientID is never written to a log or a message.

Geometry follows DICOM PS3.3 C.7.6.2.1.1: ImageOrientationPatient gives the direction of a row (increasing
column index) and of a column (increasing row index) in patient LPS; ImagePositionPatient is the centre of the
first pixel; PixelSpacing is (between rows, between columns). Volumes come out as X = column index, Y = row
index, Z = slice index ordered along the slice normal (row x column), with a RAS+ affine (LPS -> RAS flips the
first two world axes). Slices are ordered by position, never by file name or InstanceNumber.

Two passes, so that a series is refused before any pixel is decoded: first every file's header (its pixel data
left on disk) is read through :class:`_Tags`, whose checks turn a missing or malformed value into a
:class:`ScanError` naming the file and the tag (the file is skipped, never the site); the files are grouped into
series, and each series is checked for stacking and against the voxel limit. Then each series gets one float32
array, filled slice by slice: decoded by pydicom's pixel plugins (pylibjpeg for JPEG, JPEG-LS and JPEG 2000,
pydicom itself for RLE and uncompressed data; GDCM where installed) and mapped to scanner units by the Modality
LUT (:func:`pydicom.pixels.apply_modality_lut`: the ModalityLUTSequence, else RescaleSlope and RescaleIntercept).
Peak memory is the volume plus one file.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID

from client.data.errors import ScanError, Skipped
from client.data.files import list_scan_files
from client.data.volume import MODALITIES, Volume, check_voxel_limit, spacing_from_affine

log = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SAME_POSITION_MM = 1e-3  # slices closer than this along the normal are at the same location
_SPACING_RTOL = 0.02  # slice gaps may differ this much (relative) before the series counts as uneven
_DIRECTION_ATOL = 1e-3  # direction cosines that differ less than this are the same orientation
_ORTHOGONAL_ATOL = 1e-2  # |row . column| above this: ImageOrientationPatient is not two perpendicular directions
_DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_HEADER_DEFER_BYTES = 64 * 1024  # values larger than this (the pixel data) stay on disk while headers are read
_BITS_ALLOCATED = (8, 16, 32)
_REEXPORT = "copy it again from the scanner or PACS, or remove it from the site folder"
_FIX_TAG = "re-export the series from the scanner or PACS (or correct the tag), or remove the file from the site folder"


@dataclass(frozen=True, eq=False)
class _Slice:
    """One 2D image's header: a single-frame file, or one frame of a multi-frame file. No pixels yet."""

    path: Path
    frame: int  # frame index within the file (0 for single-frame files)
    series_uid: str
    patient_id: str  # PatientID, stripped; "" when absent or empty
    instance_uid: str  # SOPInstanceUID, or the path when the file has none
    modality: str
    shape: tuple[int, int]  # (Rows, Columns)
    modality_lut: Dataset  # the Modality LUT Module: the file's ModalityLUTSequence, or this frame's rescale
    position: np.ndarray | None  # (3,) LPS mm of the first pixel's centre; None when the file has no geometry
    row_dir: np.ndarray  # (3,) LPS unit vector along a row (increasing column index)
    col_dir: np.ndarray  # (3,) LPS unit vector down a column (increasing row index)
    pixel_spacing: tuple[float, float]  # mm between rows, between columns
    thickness: float | None  # mm: SliceThickness, else SpacingBetweenSlices (the Z size of a lone slice)


def read_dicom_folder(
    folder: str | PathLike[str], *, max_voxels: int | None = None
) -> tuple[list[Volume], list[Skipped]]:
    """Read every DICOM series under ``folder`` (recursive; hidden files, ``site.toml`` and README* ignored).

    Returns the volumes (one per SeriesInstanceUID) and the files or series that could not be used, each with
    its reason. ``max_voxels``: series with more voxels are skipped before their pixels are read (None: no
    limit). Raises :class:`ScanError` when ``folder`` is not an existing folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ScanError(folder, "is not an existing folder", "check the path")
    return read_dicom_files(list_scan_files(folder), max_voxels=max_voxels)


def read_dicom_files(
    paths: Iterable[str | PathLike[str]], *, max_voxels: int | None = None
) -> tuple[list[Volume], list[Skipped]]:
    """Read DICOM files, group them by SeriesInstanceUID (whatever folders they are in), stack each series.

    A series of one single-frame file is a valid one-slice volume (Z = 1, Z spacing = SliceThickness).
    Corrupt, truncated, non-DICOM and non-image files, files with a missing or malformed tag, series that cannot
    be stacked (mixed sizes or orientations, several images per position, missing slices), series above
    ``max_voxels`` (None: no limit) and series with an image that cannot be decoded come back as
    :class:`Skipped`, each with its reason; nothing in a file raises.
    """
    series: dict[str, list[_Slice]] = {}
    skipped: list[Skipped] = []
    for path in paths:
        try:
            slices = _read_header(Path(path))
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
            volumes.append(_stack(uid, unique, max_voxels))
        except ScanError as error:
            skipped.append(Skipped.from_error(error))
    return volumes, skipped


# --------------------------------------------------------------------------------------- checked tags


class _Tags:
    """Checked reads of one file's attributes.

    A value is looked up in a frame's per-frame functional group, else the shared group, else at top level
    (enhanced multi-frame files keep geometry and rescale in functional groups; classic files at top level).
    A value pydicom cannot convert, of the wrong count, not finite or out of range raises :class:`ScanError`
    naming the file and the tag; an absent or empty value is None.
    """

    def __init__(self, path: Path, ds: Dataset) -> None:
        self.path = path
        self.ds = ds

    def fail(self, keyword: str, value: Any, expected: str) -> NoReturn:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ScanError(self.path, f"malformed {keyword} {shown}: {expected}", _FIX_TAG)

    def get(self, keyword: str, frame: int = 0, group: str | None = None) -> Any:
        """The value of ``keyword`` (in functional group ``group`` of frame ``frame`` first), or None."""
        try:
            value = self._lookup(keyword, frame, group)
        except Exception as exc:  # pydicom raises many types converting a damaged value
            raise ScanError(
                self.path, f"malformed {keyword} (cannot be read: {type(exc).__name__}: {exc})", _FIX_TAG
            ) from exc
        return None if value is None or _is_empty(value) else value

    def _lookup(self, keyword: str, frame: int, group: str | None) -> Any:
        if group is not None:
            groups = []
            per_frame = self.ds.get("PerFrameFunctionalGroupsSequence")
            if per_frame and frame < len(per_frame):
                groups.append(per_frame[frame])
            shared = self.ds.get("SharedFunctionalGroupsSequence")
            if shared:
                groups.append(shared[0])
            for item in groups:
                found = item.get(group)
                if found and found[0].get(keyword) not in (None, ""):
                    return found[0].get(keyword)
        return self.ds.get(keyword)

    def numbers(
        self, keyword: str, count: int, frame: int = 0, group: str | None = None, *, positive: bool = False
    ) -> tuple[float, ...] | None:
        """``count`` finite numbers (each > 0 if ``positive``), or None when the tag is absent or empty."""
        value = self.get(keyword, frame, group)
        if value is None:
            return None
        expected = f"{count} {'positive ' if positive else ''}number{'s' if count > 1 else ''} expected"
        try:
            items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
            numbers = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            self.fail(keyword, value, expected)
        if len(numbers) != count or not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
            self.fail(keyword, value, expected)
        return numbers

    def number(self, keyword: str, frame: int = 0, group: str | None = None, *, positive: bool = False) -> float | None:
        """One finite number, or None when absent or empty."""
        found = self.numbers(keyword, 1, frame, group, positive=positive)
        return None if found is None else found[0]

    def integer(self, keyword: str, allowed: Collection[int], default: int | None = None) -> int:
        """An integer in ``allowed``; ``default`` when absent (None: the tag is required)."""
        value = self.get(keyword)
        if value is None:
            if default is None:
                raise ScanError(self.path, f"image without {keyword}", _FIX_TAG)
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(keyword, value, "an integer expected")
        if number != value or number not in allowed:
            self.fail(keyword, value, f"an integer in {_describe(allowed)} expected")
        return number

    def text(self, keyword: str) -> str:
        """The value as stripped text; "" when absent."""
        value = self.get(keyword)
        return "" if value is None else str(value).strip()


def _is_empty(value: Any) -> bool:
    """An empty text, list of values or sequence (numbers have no length and are never empty)."""
    try:
        return len(value.strip() if isinstance(value, (str, bytes)) else value) == 0
    except TypeError:
        return False


def _describe(allowed: Collection[int]) -> str:
    if isinstance(allowed, range):
        return f"{allowed.start}..{allowed.stop - 1}"
    return ", ".join(map(str, allowed))


# ----------------------------------------------------------------------------------- one file's header


def _read_header(path: Path) -> list[_Slice]:
    """The images of one DICOM file (one per frame), from its header; :class:`ScanError` when none is usable."""
    ds = _read_dataset(path, defer_size=_HEADER_DEFER_BYTES)
    try:
        return _header_slices(path, ds)
    except ScanError:
        raise
    except Exception as exc:  # a value none of the checks foresaw: it costs this file, never the site
        log.warning("unexpected problem in the header of %s", path, exc_info=True)
        raise ScanError(path, f"unreadable header ({type(exc).__name__}: {exc})", _FIX_TAG) from exc


def _header_slices(path: Path, ds: Dataset) -> list[_Slice]:
    if "PixelData" not in ds:
        raise ScanError(path, *_no_pixels_problem(ds))
    tags = _Tags(path, ds)
    modality = tags.text("Modality").upper()
    if modality not in MODALITIES:
        raise ScanError(
            path,
            f"modality {modality or '(missing)'} is not supported: only {' and '.join(MODALITIES)} images are used",
            "remove it from the site folder",
        )
    if tags.integer("SamplesPerPixel", range(1, 5), default=1) != 1:
        raise ScanError(
            path,
            f"colour image ({tags.text('PhotometricInterpretation') or '?'}), not a greyscale CT/MR image",
            "remove it from the site folder",
        )
    shape = (tags.integer("Rows", range(1, 65536)), tags.integer("Columns", range(1, 65536)))
    bits = tags.integer("BitsAllocated", _BITS_ALLOCATED)
    tags.integer("BitsStored", range(1, bits + 1), default=bits)  # checked here; the decoder reads them
    tags.integer("PixelRepresentation", (0, 1), default=0)
    n_frames = tags.integer("NumberOfFrames", range(1, 2**31), default=1)
    _check_pixel_data(path, ds)
    lut_sequence = _modality_lut_sequence(tags)
    row_dir, col_dir, has_orientation = _orientation(tags)
    positions = _frame_positions(tags, n_frames, np.cross(row_dir, col_dir))
    series_uid = tags.text("SeriesInstanceUID")
    if not series_uid:
        series_uid = f"{path.parent}#no-SeriesInstanceUID"
        log.warning("%s has no SeriesInstanceUID: grouped with the other such files of its folder", path)
    patient_id, instance_uid = tags.text("PatientID"), tags.text("SOPInstanceUID") or str(path)
    return [
        _Slice(
            path=path,
            frame=k,
            series_uid=series_uid,
            patient_id=patient_id,
            instance_uid=instance_uid,
            modality=modality,
            shape=shape,
            modality_lut=_rescale(tags, k) if lut_sequence is None else lut_sequence,
            position=positions[k] if has_orientation else None,
            row_dir=row_dir,
            col_dir=col_dir,
            pixel_spacing=_pixel_spacing(tags, k),
            thickness=_thickness(tags, k),
        )
        for k in range(n_frames)
    ]


def _thickness(tags: _Tags, frame: int) -> float | None:
    """mm: SliceThickness, else SpacingBetweenSlices; None when neither is a positive number."""
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        value = tags.number(keyword, frame, "PixelMeasuresSequence")
        if value is not None and value > 0:
            return value
    return None


def _read_dataset(path: Path, defer_size: int | None = None) -> Dataset:
    """Parse a file as DICOM, also accepting files without the 128-byte preamble if they hold an image.

    ``defer_size``: values longer than this many bytes are read from disk only when used (the pixel data, while
    headers are read).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each odd element of a damaged file; the error says it
        try:
            return pydicom.dcmread(path, defer_size=defer_size)
        except InvalidDicomError:
            pass
        except OSError as exc:
            raise ScanError(path, f"cannot be opened ({type(exc).__name__}: {exc})", "check its permissions") from exc
        except Exception as exc:  # pydicom raises many types on damaged files
            raise ScanError(path, f"damaged DICOM file ({type(exc).__name__}: {exc})", _REEXPORT) from exc
        if _starts_like_raw_dicom(path):
            try:
                ds = pydicom.dcmread(path, force=True, defer_size=defer_size)
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


def _check_pixel_data(path: Path, ds: Dataset) -> None:
    """Refuse, before decoding, pixel data that ends past the end of the file (a truncated copy) or that is
    compressed with a transfer syntax no installed plugin decodes."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    syntax = UID(syntax) if syntax else None
    element = ds.get_item("PixelData")
    start, length = getattr(element, "value_tell", None), getattr(element, "length", None)
    # offsets in a deflated file are those of its inflated copy; an encapsulated value has no length up front
    if start is not None and length not in (None, 0xFFFFFFFF) and not (syntax and syntax.is_deflated):
        beyond = start + length - path.stat().st_size
        if beyond > 0:
            raise ScanError(
                path, f"the file is truncated: its pixel data ends {beyond} bytes past the end of the file", _REEXPORT
            )
    if syntax is not None and syntax.is_compressed and not _decoder_available(syntax):
        raise ScanError(
            path, f"compressed as {syntax.name}, which no installed decoder reads",
            "re-export the series uncompressed, or install python-gdcm (pip install python-gdcm), which decodes more",
        )


def _decoder_available(syntax: UID) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # a transfer syntax pydicom has no decoder class for
        return False


def _rescale(tags: _Tags, frame: int) -> Dataset:
    """One frame's Modality LUT Module as RescaleSlope and RescaleIntercept (the frame's
    PixelValueTransformationSequence first; 1 and 0 when absent)."""
    slope = tags.number("RescaleSlope", frame, "PixelValueTransformationSequence")
    if slope == 0:
        tags.fail("RescaleSlope", 0, "a non-zero number expected (0 maps every pixel to one value)")
    rescale = Dataset()
    rescale.RescaleSlope = 1.0 if slope is None else slope
    rescale.RescaleIntercept = tags.number("RescaleIntercept", frame, "PixelValueTransformationSequence") or 0.0
    return rescale


def _modality_lut_sequence(tags: _Tags) -> Dataset | None:
    """The file's Modality LUT Module as its ModalityLUTSequence (None when it has none), checked by mapping every
    stored value the table covers."""
    sequence = tags.get("ModalityLUTSequence")
    if sequence is None:
        return None
    item = _Tags(tags.path, sequence[0])
    descriptor = item.numbers("LUTDescriptor", 3)
    if descriptor is None or descriptor[2] not in (8, 16):
        item.fail("ModalityLUTSequence LUTDescriptor", descriptor, "(entries, first mapped value, 8 or 16 bits)")
    lut = Dataset()
    lut.ModalityLUTSequence = sequence
    lut.set_original_encoding(*tags.ds.original_encoding)  # the byte order of OW LUTData
    entries = int(descriptor[0]) or 2**16
    try:
        mapped = apply_modality_lut(np.arange(entries, dtype=np.int64) + int(descriptor[1]), lut)
    except Exception as exc:  # short or unreadable LUTData: struct, index and value errors
        item.fail("ModalityLUTSequence LUTData", f"{type(exc).__name__}: {exc}", f"{entries} values expected")
    if mapped.shape != (entries,):
        item.fail("ModalityLUTSequence LUTData", mapped.shape, f"{entries} values expected")
    return lut


# ------------------------------------------------------------------------------------------- geometry


def _vector(value: tuple[float, ...]) -> np.ndarray:
    return np.array(value, dtype=np.float64)


def _orientation(tags: _Tags) -> tuple[np.ndarray, np.ndarray, bool]:
    """(row direction, column direction, whether the file states them); unit LPS vectors, from frame 0."""
    keyword = "ImageOrientationPatient"
    value = tags.numbers(keyword, 6, 0, "PlaneOrientationSequence")
    cosines = _vector(value if value is not None else _DEFAULT_ORIENTATION)
    row_dir, col_dir = cosines[:3], cosines[3:]
    row_norm, col_norm = float(np.linalg.norm(row_dir)), float(np.linalg.norm(col_dir))
    if min(row_norm, col_norm) < 0.5 or abs(row_dir @ col_dir) / (row_norm * col_norm) > _ORTHOGONAL_ATOL:
        tags.fail(keyword, value, "two perpendicular unit directions (6 numbers) expected")
    return row_dir / row_norm, col_dir / col_norm, value is not None


def _frame_positions(tags: _Tags, n_frames: int, normal: np.ndarray) -> list[np.ndarray | None]:
    """ImagePositionPatient (LPS mm) of each frame; None for a single frame without one.

    Multi-frame files need per-frame positions (enhanced files), or a first position plus
    SpacingBetweenSlices (classic multi-frame volumes); otherwise :class:`ScanError` (cine, time series).
    """
    keyword, group = "ImagePositionPatient", "PlanePositionSequence"
    per_frame = tags.get("PerFrameFunctionalGroupsSequence") or []
    if n_frames > 1 and len(per_frame) >= n_frames and all(group in item for item in per_frame[:n_frames]):
        positions = [tags.numbers(keyword, 3, k, group) for k in range(n_frames)]
        if any(position is None for position in positions):
            raise ScanError(tags.path, f"a frame's {group} has no {keyword}", _FIX_TAG)
        return [_vector(position) for position in positions]
    first = tags.numbers(keyword, 3, 0, group)
    if n_frames == 1:
        return [None if first is None else _vector(first)]
    step = tags.number("SpacingBetweenSlices", 0, "PixelMeasuresSequence")
    if first is None or not step:
        raise ScanError(
            tags.path,
            f"multi-frame file ({n_frames} frames) without per-frame positions or SpacingBetweenSlices: the frames "
            "cannot be placed in space (a cine or time series is not a volume)",
            "export the volume as one file per slice, or as an enhanced multi-frame file with per-frame positions",
        )
    return [_vector(first) + k * step * normal for k in range(n_frames)]


def _pixel_spacing(tags: _Tags, frame: int) -> tuple[float, float]:
    """(between rows, between columns) in mm: PixelSpacing, else ImagerPixelSpacing."""
    value = tags.numbers("PixelSpacing", 2, frame, "PixelMeasuresSequence", positive=True)
    value = value or tags.numbers("ImagerPixelSpacing", 2, positive=True)
    if value is None:
        raise ScanError(tags.path, "image without PixelSpacing: the voxel size is unknown", _FIX_TAG)
    return value[0], value[1]


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
    if a.shape != b.shape:
        return f"image size ({a.shape[0]}x{a.shape[1]} and {b.shape[0]}x{b.shape[1]})"
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


def _stack(uid: str, slices: list[_Slice], max_voxels: int | None) -> Volume:
    """One series' images as a :class:`Volume` (X = columns, Y = rows, Z along the slice normal).

    Everything is checked from the headers (sizes, orientations, spacing, ``max_voxels``) before one float32
    array is allocated and filled image by image.
    """
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
    rows, columns = first.shape
    check_voxel_limit(source, (columns, rows, len(slices)), max_voxels)
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
        array=_pixels(source, slices),
        spacing=spacing_from_affine(affine),
        affine=affine,
        modality=first.modality,
        source=source,
        subject=uid,
        patient=first.patient_id or uid,
    )


def _pixels(source: str, slices: list[_Slice]) -> np.ndarray:
    """float32 (Columns, Rows, len(slices)) in scanner units: slice k of the array is ``slices[k]``.

    Each file is read once (with all its frames in this series); :class:`ScanError` naming the series and its
    first undecodable image when any image cannot be decoded (the series would lack that slice).
    """
    rows, columns = slices[0].shape
    array = np.empty((columns, rows, len(slices)), dtype=np.float32)
    by_file: dict[Path, list[int]] = {}
    for k, item in enumerate(slices):
        by_file.setdefault(item.path, []).append(k)
    failures: list[ScanError] = []
    for path, indices in by_file.items():
        try:
            _decode_into(array, path, [(k, slices[k]) for k in indices])
        except ScanError as error:
            failures.append(error)
    if not failures:
        return array
    if len(by_file) == 1:
        raise failures[0]
    raise ScanError(
        source,
        f"{len(failures)} of its {len(by_file)} files cannot be decoded, e.g. {failures[0].path}: "
        f"{failures[0].problem}",
        failures[0].hint,
    )


def _decode_into(array: np.ndarray, path: Path, targets: list[tuple[int, _Slice]]) -> None:
    """Decode the frames ``targets`` names of the file ``path`` into ``array[:, :, k]`` (Modality LUT applied)."""
    ds = _read_dataset(path)
    for k, item in targets:
        try:
            stored = pixel_array(ds, index=item.frame)
            scanner = apply_modality_lut(stored, item.modality_lut)
        except Exception as exc:  # pydicom's decoders raise many types on truncated or damaged data
            syntax = ds.file_meta.get("TransferSyntaxUID")
            kind = f" ({UID(syntax).name})" if syntax is not None and UID(syntax).is_compressed else ""
            raise ScanError(
                path, f"pixel data{kind} cannot be decoded ({type(exc).__name__}: {exc})",
                "the file is truncated or damaged: " + _REEXPORT,
            ) from exc
        if stored.shape != item.shape:
            raise ScanError(path, f"decoded image is {stored.shape}, not Rows x Columns {item.shape}", _REEXPORT)
        array[:, :, k] = scanner.T


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
