"""Phantom anatomy and phantom sites: determinism, tissue content, fine detail, site-folder format.

How fast the default sites are written is measured by ``benchmarks/speed_checks.py``."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from client.data.site import MIN_TEST_SCANS, load_site
from client.degrade import profile_from_config
from simulation.cli import PHANTOM_SUBJECTS
from simulation.phantoms import (
    LOOKS,
    SUBJECTS_PER_SITE,
    TISSUES,
    make_phantom,
    render,
    site_look,
    write_phantom_sites,
)

SHAPE = (96, 96, 48)


def high_frequency_fraction(vol: np.ndarray, cutoff: float = 0.25) -> float:
    """Share of the (mean-removed) spectral energy above ``cutoff`` cycles/voxel."""
    power = np.abs(np.fft.rfftn(vol - vol.mean())) ** 2
    kx, ky = (np.fft.fftfreq(n) for n in vol.shape[:2])
    kz = np.fft.rfftfreq(vol.shape[2])
    radius = np.sqrt(kx[:, None, None] ** 2 + ky[None, :, None] ** 2 + kz[None, None, :] ** 2)
    return float(power[radius > cutoff].sum() / power.sum())


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return make_phantom(SHAPE, seed=0)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_phantom_sites(tmp_path_factory.mktemp("phantom-sites"))


def test_phantom_is_deterministic_and_seed_dependent(phantom: np.ndarray) -> None:
    assert make_phantom(SHAPE, seed=0).tobytes() == phantom.tobytes()
    assert not np.array_equal(make_phantom(SHAPE, seed=1), phantom)
    look = LOOKS[0]
    assert render(phantom, look, seed=3).tobytes() == render(phantom, look, seed=3).tobytes()
    assert not np.array_equal(render(phantom, look, seed=3), render(phantom, look, seed=4))


def test_phantom_fractions_are_a_partition(phantom: np.ndarray) -> None:
    assert phantom.shape == (len(TISSUES),) + SHAPE and phantom.dtype == np.float32
    assert phantom.min() >= 0.0 and phantom.max() <= 1.0
    np.testing.assert_allclose(phantom.sum(axis=0), 1.0, atol=1e-5)


def test_phantom_has_every_tissue_and_partial_volume(phantom: np.ndarray) -> None:
    dominant = np.bincount(phantom.argmax(axis=0).ravel(), minlength=len(TISSUES))
    counts = dict(zip(TISSUES, dominant, strict=True))
    for tissue in ("background", "scalp", "skull", "csf", "grey_matter", "white_matter"):
        assert counts[tissue] > 5000, counts
    assert counts["deep_grey"] > 200 and counts["vessel"] > 50, counts
    assert phantom[TISSUES.index("lesion")].sum() > 5
    mixed = (phantom.max(axis=0) < 0.9).mean()
    assert 0.05 < mixed < 0.5  # smooth (partial-volume) boundaries, not a label map


def test_phantom_has_fine_detail(phantom: np.ndarray) -> None:
    for look in LOOKS:
        image = render(phantom, dataclasses.replace(look, hr_noise=0.0), seed=1)
        sharp = high_frequency_fraction(image)
        assert sharp > 0.003
        # The HR scan carries its own (narrow) PSF; a 1.5-voxel blur must still remove most of the detail.
        assert sharp > 5 * high_frequency_fraction(gaussian_filter(image, 1.5))


def test_looks_differ_in_contrast() -> None:
    contrasts = [np.asarray(site_look(i).contrast) for i in range(6)]
    white, csf = TISSUES.index("white_matter"), TISSUES.index("csf")
    assert contrasts[0][white] > contrasts[0][csf]  # T1-like
    assert contrasts[1][white] < contrasts[1][csf]  # T2-like
    assert len({c.tobytes() for c in contrasts}) == 6


def test_default_sites_are_named_by_scanner(sites: list[Path]) -> None:
    assert [p.name for p in sites] == ["site-1-siemens-3t", "site-2-ge-1.5t", "site-3-philips-3t"]


def test_site_scans_are_float32_1mm_ras_nifti(sites: list[Path]) -> None:
    for site in sites:
        scans = sorted(site.glob("*.nii.gz"))
        assert [p.name for p in scans] == [f"sub-{j:03d}.nii.gz" for j in range(1, SUBJECTS_PER_SITE + 1)]
        img = nib.load(scans[0])
        assert img.shape == SHAPE and img.get_data_dtype() == np.float32
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        data = img.get_fdata(dtype=np.float32)
        assert np.isfinite(data).all() and data.min() >= 0 and data.max() > 100  # scanner units, not [0, 1]
    first = [nib.load(s / "sub-001.nii.gz").get_fdata(dtype=np.float32) for s in sites]
    assert not np.array_equal(first[0], first[1])


def test_site_toml_parses_and_profiles_differ(sites: list[Path]) -> None:
    profiles = []
    for site in sites:
        config = tomllib.loads((site / "site.toml").read_text())
        assert config["name"] == site.name and config["modality"] == "MR"
        assert config["scanner"] in {"Siemens 3T", "GE 1.5T", "Philips 3T"}
        assert isinstance(config["split"]["seed"], int)
        assert config["share_local_model"] is True and config["share_previews"] is True  # simulated: no patient
        profiles.append(profile_from_config(config["acquisition"], config["modality"]))
    assert len(set(profiles)) == len(profiles)


def test_default_phantom_sites_hold_out_enough_test_scans_for_an_interval(sites: list[Path]) -> None:
    assert PHANTOM_SUBJECTS == SUBJECTS_PER_SITE  # `fedsr simulate` writes the sites measured here
    for site_dir in sites:
        site = load_site(site_dir)
        counts = site.split_counts()
        assert counts["test"]["scans"] >= MIN_TEST_SCANS >= 3, counts
        assert counts["train"]["scans"] >= 4 and counts["val"]["scans"] >= 1, counts
        assert site.test_note() is None
        assert site.config.share_local_model and site.config.share_previews


def test_more_sites_than_looks_are_distinct(tmp_path: Path) -> None:
    written = write_phantom_sites(tmp_path, n_sites=7, subjects_per_site=1, shape=(32, 32, 16), seed=5)
    assert len({p.name for p in written}) == 7 and written[3].name == "site-4-siemens-3t"
    configs = [tomllib.loads((p / "site.toml").read_text()) for p in written]
    profiles = [profile_from_config(c["acquisition"], c["modality"]) for c in configs]
    assert len(set(profiles)) == 7
    assert len({c["split"]["seed"] for c in configs}) == 7
    assert all(nib.load(p / "sub-001.nii.gz").shape == (32, 32, 16) for p in written)


def test_site_writing_is_deterministic(tmp_path: Path) -> None:
    a = write_phantom_sites(tmp_path / "a", n_sites=2, subjects_per_site=1, shape=(32, 32, 16), seed=9)
    b = write_phantom_sites(tmp_path / "b", n_sites=2, subjects_per_site=1, shape=(32, 32, 16), seed=9)
    for x, y in zip(a, b, strict=True):
        assert (x / "site.toml").read_text() == (y / "site.toml").read_text()
        assert (x / "sub-001.nii.gz").read_bytes() == (y / "sub-001.nii.gz").read_bytes()


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16"):
        make_phantom((8, 32, 32))
    with pytest.raises(ValueError, match="at least one"):
        write_phantom_sites(tmp_path, n_sites=0)
    with pytest.raises(ValueError, match="tissue fractions"):
        render(np.zeros((3, 16, 16, 16), dtype=np.float32), LOOKS[0])
