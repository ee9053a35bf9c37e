"""One scan through ``fedsr infer``: read it once, check the model fits it, super-resolve it slab by slab, map each
slab back to scanner units and write it as it comes, then move the finished output into place.

Scanner units: the model sees and returns [0, 1], the checkpoint's intensity rule fitted to the scan (a CT window;
an MR scan's own foreground percentiles); its output is mapped back through the same rule. Where the output is
saturated (0 or 1: the model only knows the rule's range), the interpolation of the input says how far beyond
the range the voxel lies, so bone and air of a CT keep their HU, bright or dark MR voxels their values.

A model conditioned on the acquisition is given each scan's description (defaults, a DICOM input's headers,
``--acquisition``) before it runs on that scan (:meth:`~client.inference.model.InferenceModel.condition`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from client.data.nifti import is_nifti, nifti_stem
from client.inference.dicom_out import DicomSeriesWriter, PixelEncoding
from client.inference.errors import InferenceError
from client.inference.model import InferenceModel
from client.inference.nifti_out import NiftiWriter
from client.inference.preview import PreviewPlanes
from client.inference.resample import interpolate_slab
from client.inference.scans import InputScan, ScanSource, integer_type, read_scan
from client.inference.staging import StagedOutput, refuse_existing
from shared_models.image import Normalisation, ScanImage
from shared_models.inference import iter_super_resolve, plan_inference

FORMATS = ("nifti", "dicom")
#: Output slices mapped back and written per step (bounds the interpolation's temporary arrays).
WRITE_SLICES = 8
#: What a preview's file name adds to the output's name.
PREVIEW_SUFFIX = "_preview.png"


@dataclass(frozen=True)
class InferOptions:
    """What ``fedsr infer`` was asked, beyond the model and the paths.

    ``output_format``: "nifti" or "dicom" (None: a single output's name tells, a batch's as each input). ``modality``: a
    NIfTI input's ("MR"/"CT"; None: the model's, when it knows one). ``site``: whose intensity rule, where the
    checkpoint's sites differ. ``batch_size``, ``tile``: slices (2D) or tiles (3D) per pass and the 3D tile side
    (None: from the free memory). ``overwrite``: replace an existing output. ``preview``: write a PNG beside it.
    ``acquisition``: ``{field: value}`` of the acquisition description (``--acquisition``; fields and units of
    ``shared_models.conditioning.ACQUISITION_FIELDS``) over what a scan's headers say, for a conditioned model;
    kept read-only.
    """

    output_format: str | None = None
    modality: str | None = None
    site: str | None = None
    batch_size: int | None = None
    tile: int | None = None
    overwrite: bool = False
    preview: bool = False
    acquisition: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "acquisition", MappingProxyType(dict(self.acquisition)))


@dataclass(frozen=True)
class InferResult:
    """A finished scan: where it came from and went, its grids (X, Y, Z), warnings, the preview, seconds taken."""

    source: str
    output: Path
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    warnings: tuple[str, ...]
    preview: Path | None
    seconds: float


#: ``progress(done, total)``: output slices written so far, of all.
Progress = Callable[[int, int], None]


def infer_scan(model: InferenceModel, source: ScanSource, output: Path, options: InferOptions, *,
               device: torch.device | str = "cpu", progress: Progress | None = None) -> InferResult:
    """Super-resolve one scan into ``output`` (a .nii/.nii.gz file or a DICOM series folder).

    Raises :class:`InferenceError` / ``ScanError`` (refused: the output exists, lies in the input, the model does
    not fit the scan...). On any failure nothing is left at ``output`` (an existing one is kept).
    """
    start = time.perf_counter()
    output_format = resolve_format(output, options.output_format)
    check_paths(source, output, options.overwrite)
    scan = read_scan(source, nifti_modality(model, source, options.modality))
    if options.modality not in (None, scan.volume.modality):
        raise InferenceError(source.location, f"is a {scan.volume.modality} series, not {options.modality}",
                             "leave --modality out: a DICOM series states its own")
    mapping, warnings = model.prepare(scan.volume, options.site)
    warnings += model.condition(scan.volume.modality, scan.header, options.acquisition)
    volume = scan.volume
    shape = tuple(int(n * f) for n, f in zip(volume.array.shape, model.factors))
    image = ScanImage(mapping.apply(volume.array), volume.affine, volume.modality, mapping)
    affine = image.with_voxels(np.broadcast_to(np.float32(0), shape)).affine  # only the shape is read
    plan = plan_inference(model.net, volume.array.shape, device=device, batch_size=options.batch_size,
                          tile=options.tile)
    planes = PreviewPlanes(volume.array, volume.affine, shape, coronal=model.factors[0] == 1) \
        if options.preview else None
    with _open_writer(output_format, output, scan, model, mapping, shape, affine, options.overwrite) as writer:
        for z0, block in iter_super_resolve(model.net, image.voxels, device=device, plan=plan):
            for k in range(0, block.shape[2], WRITE_SLICES):
                sr = block[:, :, k : k + WRITE_SLICES]
                interpolated = interpolate_slab(volume.array, shape, z0 + k, sr.shape[2], scan.value_range)
                units = to_scanner_units(sr, interpolated, mapping)
                writer.write(z0 + k, units)
                if planes is not None:
                    planes.add(z0 + k, interpolated, units)
                if progress is not None:
                    progress(z0 + k + sr.shape[2], shape[2])
        written = writer.commit()
    preview = None
    if planes is not None:
        title = f"{source.location}\n{model.describe()}"
        preview = planes.save(preview_path(written), (mapping.lo, mapping.hi), title)
    return InferResult(source.location, written, volume.array.shape, shape, (*scan.notes, *warnings), preview,
                       time.perf_counter() - start)


def to_scanner_units(sr: np.ndarray, interpolated: np.ndarray, mapping: Normalisation) -> np.ndarray:
    """SR output in [0, 1] -> scanner units through ``mapping``; where it is saturated (0 or 1) the interpolation
    (scanner units, same shape) decides how far beyond the mapping's range the voxel lies. float32."""
    units = mapping.invert(sr)
    np.copyto(units, np.maximum(units, interpolated), where=sr >= 1.0)
    np.copyto(units, np.minimum(units, interpolated), where=sr <= 0.0)
    return units


def resolve_format(output: Path, asked: str | None) -> str:
    """The output's format, told by its name: .nii/.nii.gz a NIfTI file, anything else a DICOM series folder;
    ``asked`` (--format), if given, must agree."""
    by_name = "nifti" if is_nifti(output) else "dicom"
    if asked is not None and asked != by_name:
        hint = "name the output NAME.nii.gz" if asked == "nifti" else "name a folder for the series (no .nii suffix)"
        raise InferenceError(output, f"does not name a {asked} output", hint)
    return by_name


def check_paths(source: ScanSource, output: Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``), is the input, holds it, or lies inside the input
    series' folder."""
    refuse_existing(output, overwrite)
    target = output.resolve()
    for file in source.files:
        file = file.resolve()
        if target == file or target in file.parents:
            raise InferenceError(output, f"is or holds the input {file}", "write the output somewhere else")
    if source.kind == "dicom" and Path(source.location).resolve() in target.parents:
        raise InferenceError(output, "lies inside the input series' folder", "write the output somewhere else")


def nifti_modality(model: InferenceModel, source: ScanSource, asked: str | None) -> str:
    """The modality a NIfTI input is read as: the one asked, else the model's only one (unused for a DICOM
    series, which states its own)."""
    if asked is not None or source.kind != "nifti":
        return asked or "MR"
    if len(model.modalities) > 1:
        raise InferenceError(source.location, "is a NIfTI file, which records no modality, and the model knows "
                             f"{' and '.join(model.modalities)}", "give the scan's modality with --modality")
    return model.modalities[0] if model.modalities else "MR"


def preview_path(output: Path) -> Path:
    """Beside the output: ``NAME_preview.png`` for ``NAME.nii.gz`` or a series folder ``NAME``."""
    return output.with_name(nifti_stem(output) + PREVIEW_SUFFIX)


def _open_writer(output_format: str, output: Path, scan: InputScan, model: InferenceModel, mapping: Normalisation,
                 shape: tuple[int, int, int], affine: np.ndarray, overwrite: bool) -> StagedOutput:
    """The writer of the output, its values stored losslessly where they are whole numbers."""
    lo, hi = min(scan.value_range[0], mapping.lo), max(scan.value_range[1], mapping.hi)
    integer = integer_type(scan.integral, lo, hi)  # whole-number inputs (HU, most MR): rounded outputs
    if output_format == "nifti":
        return NiftiWriter(output, shape, affine, integer or np.dtype(np.float32), xform_code=scan.xform_code,
                           description=model.describe(digits=16), overwrite=overwrite)
    return DicomSeriesWriter(
        output, shape, affine, template=scan.header, modality=scan.volume.modality,
        encoding=PixelEncoding.for_values(lo, hi, integer),
        thickness=scan.thickness * scan.volume.array.shape[2] / shape[2], derivation=model.describe(),
        suffix=f"SR x{model.scale}", window=(mapping.lo, mapping.hi), overwrite=overwrite,
    )
