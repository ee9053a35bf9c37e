"""Writing the SR output as a DICOM series while it is produced: one single-frame CT or MR image per output slice.

A new series in the input's study: new SeriesInstanceUID and SOPInstanceUIDs, the patient, study, frame of
reference (the output lies in the same patient space), equipment and acquisition attributes of the input's first
image (:data:`KEPT`), ImageType DERIVED\\SECONDARY, a DerivationDescription naming the model and its checkpoint's
hash, and the geometry of the output grid: ImageOrientationPatient, PixelSpacing, SliceThickness,
SpacingBetweenSlices and each slice's ImagePositionPatient (PS3.3 C.7.6.2.1.1; the affine is RAS+, DICOM LPS).
Values are stored as 16-bit integers with RescaleSlope/Intercept giving back scanner units (HU for CT).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from client.inference.staging import StagedOutput

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}
_SERIES_NUMBER_OFFSET = 1000  # the derived series' number: the input's plus this
_LO_CHARS = 64  # a LO value's length limit (SeriesDescription)

#: Attributes copied from the input's first image: patient, study, frame of reference, equipment, acquisition, display.
KEPT = (
    "SpecificCharacterSet",
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
    "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    "Manufacturer", "ManufacturerModelName", "InstitutionName", "StationName",
    "BodyPartExamined", "PatientPosition", "ProtocolName", "Laterality",
    "KVP", "ConvolutionKernel", "MagneticFieldStrength", "ScanningSequence", "SequenceVariant", "ScanOptions",
    "MRAcquisitionType", "RepetitionTime", "EchoTime", "FlipAngle",
    "WindowCenter", "WindowWidth",
)
#: Attributes the written modules require, with the value used where the input has none (e.g. a NIfTI input):
#: type 2 ones empty; an MR image's scanning sequence "RM" (research mode) and variant "NONE".
REQUIRED = {
    "PatientName": "", "PatientID": "", "PatientBirthDate": "", "PatientSex": "", "StudyDate": "", "StudyTime": "",
    "StudyID": "", "AccessionNumber": "", "ReferringPhysicianName": "", "PositionReferenceIndicator": "",
    "Manufacturer": "",
}
MR_REQUIRED = {"ScanningSequence": "RM", "SequenceVariant": "NONE"}


@dataclass(frozen=True)
class PixelEncoding:
    """Stored pixel = round((value - intercept) / slope) as ``dtype`` (int16 or uint16)."""

    slope: float
    intercept: float
    dtype: np.dtype

    @classmethod
    def for_values(cls, lo: float, hi: float, integer: np.dtype | None) -> PixelEncoding:
        """Whole numbers that fit ``integer``: stored as they are (slope 1, intercept 0). Anything else in
        [lo, hi]: spread over the 65536 levels of uint16 (slope and intercept as DICOM decimal strings hold them)."""
        if integer is not None:
            return cls(1.0, 0.0, np.dtype(integer))
        slope = float(DSfloat((hi - lo) / 65535.0 or 1.0, auto_format=True))
        return cls(slope, float(DSfloat(lo, auto_format=True)), np.dtype(np.uint16))

    def stored(self, values: np.ndarray) -> np.ndarray:
        """Scanner units -> stored integers (rounded, clipped to the type)."""
        info = np.iinfo(self.dtype)
        return np.clip(np.rint((values - self.intercept) / self.slope), info.min, info.max).astype(self.dtype)


class DicomSeriesWriter(StagedOutput):
    """Write an (X, Y, Z) volume of ``shape`` as a series in ``folder``, slab by slab along Z.

    ``affine``: (4, 4) voxel -> world mm (RAS+); X runs along a row (columns), Y down a column (rows).
    ``template``: the input's first image (None: a NIfTI input, a new study). ``thickness``: the output's
    SliceThickness, mm. ``derivation``: the DerivationDescription. ``suffix``: appended to the SeriesDescription.
    ``window``: (lo, hi) scanner units shown when the input has no window of its own.
    """

    def __init__(self, folder: Path, shape: tuple[int, int, int], affine: np.ndarray, *, template: Dataset | None,
                 modality: str, encoding: PixelEncoding, thickness: float, derivation: str, suffix: str,
                 window: tuple[float, float], overwrite: bool) -> None:
        lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        self.shape, self.encoding = shape, encoding
        self._origin, self._step = lps[:, 3], lps[:, 2]
        self._normal = np.cross(lps[:, 0], lps[:, 1]) / (spacing[0] * spacing[1])
        self._base = _series_base(template, modality, derivation, suffix, window)
        self._base.ImageOrientationPatient = _ds([*(lps[:, 0] / spacing[0]), *(lps[:, 1] / spacing[1])])
        self._base.PixelSpacing = _ds([spacing[1], spacing[0]])  # between rows (along Y), between columns (X)
        self._base.SliceThickness = _ds(thickness)
        self._base.SpacingBetweenSlices = _ds(spacing[2])
        self._base.RescaleSlope = _ds(encoding.slope)
        self._base.RescaleIntercept = _ds(encoding.intercept)
        if modality == "CT":
            self._base.RescaleType = "HU"
        self._next = 0
        super().__init__(folder, folder=True, overwrite=overwrite)

    def write(self, z0: int, block: np.ndarray) -> None:
        """Write output slices ``z0 ..`` (float32 (X, Y, n), scanner units) as images; slabs must come in order."""
        if z0 != self._next or block.shape[:2] != self.shape[:2]:
            raise ValueError(f"expected slices from {self._next} of {self.shape[:2]}, got {z0} of {block.shape[:2]}")
        for k in range(block.shape[2]):
            z = z0 + k
            ds = copy.deepcopy(self._base)
            ds.set_pixel_data(np.ascontiguousarray(self.encoding.stored(block[:, :, k]).T), "MONOCHROME2", 16)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            position = self._origin + z * self._step
            ds.InstanceNumber = z + 1
            ds.ImagePositionPatient = _ds(position)
            ds.SliceLocation = _ds(float(position @ self._normal))
            ds.save_as(self.temp / f"IM{z + 1:05d}.dcm", enforce_file_format=True)
        self._next += block.shape[2]

    def commit(self) -> Path:
        """Check every slice was written, move the series into place."""
        if self._next != self.shape[2]:
            raise ValueError(f"{self.destination}: {self._next} of {self.shape[2]} slices written")
        return super().commit()


def _series_base(template: Dataset | None, modality: str, derivation: str, suffix: str,
                 window: tuple[float, float]) -> Dataset:
    """The attributes every image of the new series shares (geometry and pixels are added per image)."""
    template = template or Dataset()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in KEPT:
        if keyword in template:
            setattr(ds, keyword, template.data_element(keyword).value)
    for keyword, value in {**REQUIRED, **(MR_REQUIRED if modality == "MR" else {})}.items():
        if keyword not in ds:
            setattr(ds, keyword, value)
    now = datetime.now()
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.Modality = modality
    ds.StudyInstanceUID = template.get("StudyInstanceUID") or generate_uid()
    ds.FrameOfReferenceUID = template.get("FrameOfReferenceUID") or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = _SERIES_NUMBER_OFFSET + int(template.get("SeriesNumber") or 0)
    ds.SeriesDescription = f"{str(template.get('SeriesDescription', '')).strip()} {suffix}".strip()[-_LO_CHARS:]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = derivation
    ds.BurnedInAnnotation = "NO"
    if "WindowCenter" not in ds:
        ds.WindowCenter = _ds((window[0] + window[1]) / 2)
        ds.WindowWidth = _ds(window[1] - window[0])
    return ds


def _ds(values: float | np.ndarray | list[float]) -> DSfloat | list[DSfloat]:
    """Decimal string(s) of at most 16 characters (the DS limit), rounded as needed."""
    if np.ndim(values) == 0:
        return DSfloat(float(values), auto_format=True)
    return [DSfloat(float(v), auto_format=True) for v in np.ravel(values)]
