"""Shared test helpers: DICOM series, multi-frame files and NIfTI files written from known arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.degrade import slice_profile_subsample
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class WrittenSeries:
    """What a test wrote, and what a reader must give back.

    ``expected``: float32 (X, Y, Z) in scanner units (stored * slope + intercept), Z along the slice normal.
    ``spacing``: mm between columns, rows, slices. ``positions_ras``: (Z, 3) world mm of voxel (0, 0, k).
    ``row_ras``: world step (mm, RAS) of one voxel along X.
    """

    uid: str
    files: tuple[Path, ...]
    expected: np.ndarray
    spacing: tuple[float, float, float]
    positions_ras: np.ndarray
    row_ras: np.ndarray


def _image(modality: str, series_uid: str, rows_cols_frames: np.ndarray, sop_class: str) -> Dataset:
    """A minimal valid image dataset (file meta included) holding ``rows_cols_frames`` (int16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientID = "TEST"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.set_pixel_data(rows_cols_frames, "MONOCHROME2", 16)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_series(
    folder: Path,
    stored: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (0.7, 0.8, 2.5),
    origin_lps: tuple[float, float, float] = (-12.5, 30.0, 47.25),
    row_dir: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col_dir: tuple[float, float, float] = (0.0, 0.0, -1.0),
    slope: float = 2.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    seed: int = 0,
    prefix: str = "",
) -> WrittenSeries:
    """One file per slice of ``stored`` (int16 (X, Y, Z)): file names and InstanceNumbers shuffled.

    Default geometry is coronal: rows run to patient left, columns downwards, slices step posterior
    (normal = row x column = (0, 1, 0) in LPS), from a non-zero origin.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uid = generate_uid()
    row, col = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row, col)
    n = stored.shape[2]
    shuffled = rng.permutation(n)
    files, positions = [], []
    for k in range(n):
        position = np.asarray(origin_lps) + k * spacing[2] * normal
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        ds = _image(modality, uid, np.ascontiguousarray(stored[:, :, k].T), sop_class)
        ds.InstanceNumber = int(shuffled[k]) + 1
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
        ds.ImageOrientationPatient = [*row_dir, *col_dir]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        path = folder / f"{prefix}IM{shuffled[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        positions.append(_LPS_TO_RAS @ position)
    return WrittenSeries(
        uid=uid,
        files=tuple(files),
        expected=stored.astype(np.float32) * np.float32(slope) + np.float32(intercept),
        spacing=spacing,
        positions_ras=np.asarray(positions),
        row_ras=_LPS_TO_RAS @ row * spacing[0],
    )


def write_multiframe(
    path: Path,
    stored: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (0.9, 0.9, 3.0),
    origin_lps: tuple[float, float, float] = (10.0, -20.0, 5.0),
    slope: float = 0.5,
    intercept: float = 3.0,
    per_frame_positions: bool = True,
    seed: int = 0,
) -> WrittenSeries:
    """An axial MR volume in one multi-frame file, frames in shuffled order.

    ``per_frame_positions``: an enhanced MR file (functional groups: per-frame PlanePosition, shared
    orientation, pixel measures and rescale); False: a classic multi-frame file with no geometry per frame
    and no SpacingBetweenSlices (a cine-like file that cannot be placed in space).
    """
    rng = np.random.default_rng(seed)
    n = stored.shape[2]
    order = rng.permutation(n)  # frame f holds slice order[f]
    normal = np.array([0.0, 0.0, 1.0])
    positions = [np.asarray(origin_lps) + k * spacing[2] * normal for k in range(n)]
    frames = np.stack([stored[:, :, k].T for k in order])
    ds = _image("MR", generate_uid(), np.ascontiguousarray(frames), EnhancedMRImageStorage)
    if per_frame_positions:
        shared = Dataset()
        shared.PlaneOrientationSequence = Sequence([Dataset()])
        shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        shared.PixelMeasuresSequence = Sequence([Dataset()])
        shared.PixelMeasuresSequence[0].PixelSpacing = [spacing[1], spacing[0]]
        shared.PixelMeasuresSequence[0].SliceThickness = spacing[2]
        shared.PixelValueTransformationSequence = Sequence([Dataset()])
        shared.PixelValueTransformationSequence[0].RescaleSlope = slope
        shared.PixelValueTransformationSequence[0].RescaleIntercept = intercept
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        per_frame = []
        for k in order:
            group = Dataset()
            group.PlanePositionSequence = Sequence([Dataset()])
            group.PlanePositionSequence[0].ImagePositionPatient = [f"{v:.6g}" for v in positions[k]]
            per_frame.append(group)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    else:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = list(origin_lps)
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return WrittenSeries(
        uid=str(ds.SeriesInstanceUID),
        files=(path,),
        expected=stored.astype(np.float32) * np.float32(slope) + np.float32(intercept),
        spacing=spacing,
        positions_ras=np.asarray([_LPS_TO_RAS @ p for p in positions]),
        row_ras=_LPS_TO_RAS @ np.array([spacing[0], 0.0, 0.0]),
    )


def stored_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 (X, Y, Z) test image: a smooth ramp plus noise, every slice different."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (10 * x + 7 * y + 50 * z + rng.integers(0, 40, shape)).astype(np.int16)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save ``array`` as NIfTI (default affine: 1 mm RAS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


#: The real scans beside the project (``../shared/data``), see its SOURCES.md.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP workers spinning against other processes made
    small workloads up to 10x slower than a single thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mr_patch_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A real 32x32 T1 brain patch (Colin27, axial slice 90) as HR (1, 1, 32, 32) and its 2x2-mean LR."""
    image = nib.load(DATA / "mri" / "colin27_t1_1mm.nii.gz")
    patch = np.asarray(image.dataobj[70:102, 100:132, 90], dtype=np.float32) / 255.0
    hr = torch.from_numpy(patch)[None, None]
    return F.avg_pool2d(hr, 2), hr


def overfit_losses(model: torch.nn.Module, lr: torch.Tensor, hr: torch.Tensor, steps: int, learning_rate: float) -> list[float]:
    """L1 loss of every step of Adam with a cosine schedule fitting ``model(lr)`` to ``hr``."""
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    losses = []
    for _ in range(steps):
        loss = F.l1_loss(model(lr), hr)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def make() -> SimpleNamespace:
    """Writers of test inputs: ``make.series``, ``make.multiframe``, ``make.stored``, ``make.nifti``."""
    return SimpleNamespace(series=write_series, multiframe=write_multiframe, stored=stored_volume, nifti=write_nifti)


def make_thick_site(site_dir: Path, scale: int) -> dict[str, np.ndarray]:
    """Turn a phantom site into a thick-slice site: every scan acquired with a contiguous gaussian slice profile
    every ``scale`` slices (1 mm -> ``scale`` mm along Z), ``supervision = "self"`` in its site.toml.
    Returns the thin originals by subject (the truth such a site never has)."""
    truth = {}
    for path in sorted(site_dir.glob("*.nii.gz")):
        image = nib.load(path)
        thin = np.asarray(image.dataobj, dtype=np.float32)
        thick = slice_profile_subsample(thin, scale, 2, float(scale), 1.0)
        affine = image.affine.copy()
        affine[:3, 2] *= scale
        nib.save(nib.Nifti1Image(np.round(thick), affine), path)
        truth[path.name.removesuffix(".nii.gz")] = thin
    toml = site_dir / "site.toml"
    toml.write_text('supervision = "self"\n' + toml.read_text())
    return truth


@pytest.fixture
def round_job():
    """``round_job(settings, server_round)``: the RoundJob a site gets in that round of a run with ``settings``
    (the coordinator's round ConfigRecord, read as the ClientApp reads it), on the CPU."""
    from client.tasks.base import RoundJob

    def make(settings, server_round: int) -> RoundJob:
        config = {**settings.round_config(), "server-round": server_round}
        return RoundJob.from_config(config, torch.device("cpu"))

    return make
