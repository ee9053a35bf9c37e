"""Scans carry their geometry and intensity mapping from the reader, through pairs, to ``super_resolve``'s output.

Sites are written as real NIfTI files with an oblique affine and odd sizes (so pairs are cropped). An untrained
model (its global skip is plain interpolation) is applied to each pair's LR image: the output's affine must be the
HR grid's (voxels smaller by the scale along the restored axes, the field of view kept), and a bright blob placed at
a known world position in the file must come out at that world position.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import center_of_mass

from client.paired import InPlanePairing, IsotropicPairing
from client.pairs import prepare_site
from client.selfsup import AxisPairing
from shared_models.image import ScanImage
from shared_models.inference import super_resolve
from shared_models.registry import build_model

SHAPE = (37, 35, 18)
BLOB_VOXEL = np.array([19.3, 15.6, 9.2])  # in the file's own voxel grid


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(12.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.0])
    affine[:3, 3] = [-31.5, 12.25, -7.0]
    return affine


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A site of three NIfTI scans (a smooth background and one Gaussian blob); returns the folder and the blob's
    world position (mm)."""
    folder = tmp_path_factory.mktemp("geometry") / "site"
    folder.mkdir()
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), axis=-1).astype(np.float64)
    blob = np.exp(-0.5 * (((grid - BLOB_VOXEL) / np.array([2.0, 2.0, 1.2])) ** 2).sum(-1))
    rng = np.random.default_rng(0)
    for i in range(3):
        volume = 100.0 + 20.0 * rng.random(SHAPE) * 0.05 + 800.0 * blob
        nib.save(nib.Nifti1Image(volume.astype(np.float32), _oblique_affine()), folder / f"sub-{i}.nii.gz")
    (folder / "site.toml").write_text('[split]\nval = ["sub-1"]\ntest = ["sub-2"]\n')
    world = (_oblique_affine() @ np.append(BLOB_VOXEL, 1.0))[:3]
    return folder, world


def _blob_world(image: ScanImage) -> np.ndarray:
    voxels = np.clip(image.voxels - np.percentile(image.voxels, 90), 0, None)
    return (image.affine @ np.append(center_of_mass(voxels), 1.0))[:3]


@pytest.mark.parametrize(
    "pairing, family, params, restored",
    [
        (InPlanePairing(), "edsr", {"spatial_dims": 2}, (2, 2, 1)),
        (IsotropicPairing(), "edsr", {"spatial_dims": 3}, (2, 2, 2)),
        (AxisPairing(), "smore", {}, (1, 1, 2)),
    ],
    ids=["in-plane", "isotropic", "through-plane"],
)
def test_geometry_survives_from_the_reader_to_the_sr_output(site, pairing, family, params, restored):
    folder, blob_world = site
    prepared = prepare_site(str(folder), 2, pairing)
    pair = prepared.val[0]
    hr = pair.hr_image()
    canonical = nib.as_closest_canonical(nib.load(folder / "sub-1.nii.gz"))
    start = [(n - m) // 2 for n, m in zip(canonical.shape, pair.hr.shape)]
    np.testing.assert_allclose(hr.affine[:3, 3], (canonical.affine @ np.append(start, 1.0))[:3], atol=1e-9)

    torch.manual_seed(0)
    model = build_model(family, preset="tiny", scale=2, **params)  # untrained: interpolation through its skip
    lr = pair.lr_image()
    sr = super_resolve(model, lr)
    assert isinstance(sr, ScanImage) and sr.voxels.shape == pair.hr.shape
    np.testing.assert_allclose(np.array(sr.spacing) * restored, lr.spacing, rtol=1e-9)  # voxel size / scale
    np.testing.assert_allclose(sr.affine, hr.affine, atol=1e-9)  # the output lies on the HR grid exactly
    corner = np.array([-0.5, -0.5, -0.5, 1.0])  # the outer corner of the first voxel: the field of view is kept
    np.testing.assert_allclose(lr.affine @ corner, sr.affine @ corner, atol=1e-9)
    assert np.linalg.norm(_blob_world(sr) - blob_world) < 0.35  # mm: the anatomy is where it was
    assert sr.modality == "MR" and sr.normalisation == pair.normalisation
    assert np.isclose(sr.in_scanner_units().max(), pair.normalisation.invert(sr.voxels).max())


def test_a_partial_output_is_refused_for_an_image(site):
    folder, _ = site
    pair = prepare_site(str(folder), 2, InPlanePairing()).val[0]
    model = build_model("edsr", preset="tiny", scale=2)
    with pytest.raises(ValueError, match="partial output"):
        super_resolve(model, pair.lr_image(), slices=[0, 1])
    assert super_resolve(model, pair.lr, slices=[0, 1]).shape == (*pair.hr.shape[:2], 2)
