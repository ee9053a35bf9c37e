"""``fedsr infer`` writes the SR output where the input was in patient space (issue 11, part 3).

A marker voxel's world position is measured before (from the geometry the test wrote) and after (the intensity
centroid of the output, read back by an independent reader: nibabel for NIfTI, SimpleITK's series reader for DICOM),
with an oblique orientation and a non-zero origin. The models are untrained: each then applies a symmetric
interpolation kernel (bicubic in-plane, cubic through-plane, trilinear in 3D), whose response keeps a marker's
centroid exactly where the grid convention puts it, so a misplaced grid shows as a shift (the classic one is
half an input voxel: half an output voxel at x2); the tests allow a quarter of an output voxel.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from client.inference.model import load_model
from client.inference.run import InferOptions, infer_scan
from client.inference.scans import single_source
from shared_models.checkpoint import save_checkpoint
from shared_models.registry import build_model
from tests.conftest import DATA

CT_RULE = {"modality": "CT", "kind": "ct-window", "range": [-160.0, 240.0]}
BACKGROUND, MARKER = 40, 200  # HU: both inside the window, so no output voxel saturates
TOLERANCE = 0.25  # output voxels


def checkpoint(path: Path, family: str, rules: dict | None = None, **params) -> Path:
    """An untrained model of ``family`` (narrowed for speed) saved with a CT site's intensity rule."""
    torch.manual_seed(0)
    model = build_model(family, preset="tiny", width=8, scale=2, **params)
    return save_checkpoint(path, model, scale=2, normalisation={"site-a": CT_RULE} if rules is None else rules)


def rotation(a: float, b: float) -> np.ndarray:
    """A rotation about Z by ``a`` then about X by ``b`` (radians): an oblique orientation."""
    ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
    return np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]]) @ np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])


def centroid(values: np.ndarray, background: float) -> np.ndarray:
    """Intensity-weighted centroid (voxel indices, array axis order) of ``values - background``."""
    weight = values.astype(np.float64) - background
    grids = np.meshgrid(*(np.arange(n) for n in values.shape), indexing="ij")
    return np.array([(g * weight).sum() / weight.sum() for g in grids])


@pytest.mark.parametrize("family, params, factors", [
    ("edsr", {}, (2, 2, 1)),                     # in-plane
    ("smore", {}, (1, 1, 2)),                    # through-plane (a family's own inference)
    ("edsr", {"spatial_dims": 3}, (2, 2, 2)),    # 3D, in tiles
])
def test_nifti_marker_keeps_its_world_position(tmp_path, one_thread, family, params, factors):
    affine = np.eye(4)
    affine[:3, :3] = rotation(0.5, 0.3) @ np.diag([0.9, 0.8, 2.5])
    affine[:3, 3] = (-40.5, 12.25, 30.0)
    volume = np.full((16, 18, 10), BACKGROUND, dtype=np.int16)
    marker = (7, 9, 4)
    volume[marker] = MARKER
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "in.nii.gz")
    model = load_model(checkpoint(tmp_path / "m.pt", family, **params))
    assert model.factors == factors

    infer_scan(model, single_source(tmp_path / "in.nii.gz"), tmp_path / "out.nii.gz", InferOptions())

    out = nib.load(tmp_path / "out.nii.gz")
    data = np.asarray(out.dataobj)
    assert np.allclose(out.get_qform(), out.affine, atol=1e-5) and np.allclose(out.get_sform(), out.affine, atol=1e-5)
    code = int(nib.load(tmp_path / "in.nii.gz").header["sform_code"])
    assert int(out.header["qform_code"]) == int(out.header["sform_code"]) == code > 0
    assert sorted(out.header.get_zooms()) == pytest.approx(sorted(np.array([0.9, 0.8, 2.5]) / factors), abs=1e-5)
    assert sorted(data.shape) == sorted(np.array(volume.shape) * factors)
    before = affine @ [*marker, 1.0]
    after = out.affine @ [*centroid(data, BACKGROUND), 1.0]
    error = np.linalg.solve(out.affine, after - before)[:3]  # in output voxels
    assert np.abs(error).max() < TOLERANCE, error
    digest = hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    assert digest[:16] in out.header["descrip"].item().decode()


def read_series(folder: Path):
    """The series in ``folder`` as SimpleITK reads it: the image (LPS geometry, rescaled values) and (Z, Y, X)."""
    sitk = pytest.importorskip("SimpleITK")  # a dev dependency: the reader independent of pydicom
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    return image, sitk.GetArrayFromImage(image)


def test_dicom_marker_keeps_its_world_position_and_is_read_back_as_a_ct_volume(tmp_path, make, one_thread):
    spacing, origin = (0.7, 0.8, 2.5), (-12.5, 30.0, 47.25)
    rot = rotation(0.4, -0.25)
    row, col = rot[:, 0], rot[:, 1]
    hu = np.full((18, 16, 6), BACKGROUND, dtype=np.int16)
    marker = (8, 7, 3)
    hu[marker] = MARKER
    hu[:4, :4, 0] = -1000  # air and bone, far outside the model's window, in slices the marker is not in
    hu[-4:, -4:, 5] = 1500
    make.series(tmp_path / "in", (hu + 1024).astype(np.int16), spacing=spacing, origin_lps=origin,
                row_dir=tuple(row), col_dir=tuple(col), slope=1.0, intercept=-1024.0)
    model = load_model(checkpoint(tmp_path / "m.pt", "edsr"))

    infer_scan(model, single_source(tmp_path / "in"), tmp_path / "out", InferOptions())

    image, array = read_series(tmp_path / "out")
    assert array.shape == (6, 32, 36)  # (Z, Y, X): in-plane x2
    assert image.GetSpacing() == pytest.approx((0.35, 0.4, 2.5), abs=1e-4)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3))[:, :2], np.column_stack([row, col]), atol=1e-5)
    assert (array.min(), array.max()) == (-1000, 1500)  # HU kept beyond the window (from the interpolation)
    found = centroid(array[1:5], BACKGROUND)[::-1] + [0, 0, 1]  # (Z, Y, X) of slices 1..4 -> (x, y, z)
    before = np.asarray(origin) + marker[0] * spacing[0] * row + marker[1] * spacing[1] * col \
        + marker[2] * spacing[2] * np.cross(row, col)
    expected = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(before)))
    assert np.abs(found - expected).max() < TOLERANCE, found - expected


def test_dicom_output_is_a_new_derived_series_of_the_same_patient_and_study(tmp_path, one_thread):
    """A real CT slice (pydicom's GE test file): its patient, study and frame of reference stay; the series, the
    instances and the image type are new; the provenance names the model and the checkpoint's hash."""
    source = DATA / "dicom" / "spine_ct_small_ge.dcm"
    original = pydicom.dcmread(source)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "slice.dcm").write_bytes(source.read_bytes())
    model = load_model(checkpoint(tmp_path / "m.pt", "edsr"))

    infer_scan(model, single_source(folder), tmp_path / "out", InferOptions())

    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 1
    out = pydicom.dcmread(files[0])
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert out.get(keyword) == original.get(keyword), keyword
    row, col = np.asarray(original.ImageOrientationPatient, float).reshape(2, 3)
    assert np.allclose(np.asarray(out.ImageOrientationPatient, float), [*row, *col], atol=1e-6)
    between_rows, between_columns = (float(v) for v in original.PixelSpacing)
    first_centre = np.asarray(original.ImagePositionPatient, float) - 0.25 * (row * between_columns + col * between_rows)
    assert np.allclose(np.asarray(out.ImagePositionPatient, float), first_centre, atol=1e-4)  # a quarter pixel back
    assert out.SeriesInstanceUID != original.SeriesInstanceUID and out.SOPInstanceUID != original.SOPInstanceUID
    assert list(out.ImageType) == ["DERIVED", "SECONDARY"]
    assert hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest() in out.DerivationDescription
    assert out.SeriesDescription.endswith("SR x2")
    assert (out.Rows, out.Columns) == (2 * original.Rows, 2 * original.Columns)
    assert [float(v) for v in out.PixelSpacing] == pytest.approx([float(v) / 2 for v in original.PixelSpacing])
    assert float(out.SliceThickness) == pytest.approx(float(original.SliceThickness))
    rescaled = out.pixel_array * float(out.RescaleSlope) + float(out.RescaleIntercept)
    hu = original.pixel_array * float(original.RescaleSlope) + float(original.RescaleIntercept)
    assert rescaled.min() >= hu.min() and rescaled.max() <= hu.max()  # HU, within the input's range
    assert abs(np.median(rescaled) - np.median(hu)) < 5
