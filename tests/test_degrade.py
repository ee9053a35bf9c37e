"""Acquisition models: exact k-space behaviour, operator invariants, noise statistics, pipelines, config parsing."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from client.degrade import (
    PRESETS,
    AcquisitionProfile,
    add_gaussian_noise,
    add_poisson_like_noise,
    add_rician_noise,
    degrade_inplane,
    degrade_throughplane,
    gaussian_psf_downsample,
    kspace_truncate,
    profile_from_config,
    slice_profile_blur,
    slice_profile_subsample,
)

SPACING = (1.0, 1.0, 1.0)


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random structured volume in [0, 1], float32."""
    rng = np.random.default_rng(seed)
    vol = gaussian_filter(rng.random(shape), 1.5)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    return vol.astype(np.float32)


# --------------------------------------------------------------------------------------------- k-space


@pytest.mark.parametrize("scale", [2, 4])
def test_kspace_truncate_keeps_central_frequencies_exactly(scale: int) -> None:
    img = np.random.default_rng(1).random((32, 24, 3)).astype(np.float32)
    out = kspace_truncate(img, scale, axes=(0, 1))
    n, m = np.array(img.shape[:2]), np.array(img.shape[:2]) // scale
    assert out.shape == (m[0], m[1], 3) and out.dtype == np.float32

    hr = np.fft.fft2(img.astype(np.float64), axes=(0, 1))
    lr = np.fft.fft2(out.astype(np.float64), axes=(0, 1))
    kx, ky = (np.fft.fftfreq(mi, 1.0 / mi).astype(int) for mi in m)
    central = hr[np.ix_(kx % n[0], ky % n[1])]
    # Intensity scaling (m/n per axis) and the documented block-centre phase ramp (a sub-pixel shift).
    shift = np.exp(2j * np.pi * (scale - 1) / 2 * (kx[:, None] / n[0] + ky[None, :] / n[1]))
    expected = central * (m.prod() / n.prod()) * shift[..., None]
    interior = np.ix_(kx != -m[0] // 2, ky != -m[1] // 2)  # the LR Nyquist row/column is made Hermitian
    np.testing.assert_allclose(lr[interior], expected[interior], atol=1e-4 * np.abs(expected).max())
    magnitude = np.abs(central[interior]) * m.prod() / n.prod()
    np.testing.assert_allclose(np.abs(lr[interior]), magnitude, rtol=1e-3, atol=1e-4)
    assert out.mean() == pytest.approx(img.mean(), abs=1e-6)


def test_kspace_truncate_samples_band_limited_signal_at_block_centres() -> None:
    n, scale, f = 64, 4, 5  # frequency 5 < LR Nyquist (8): kept exactly
    t = np.arange(n)
    img = np.cos(2 * np.pi * f * t / n + 0.3)[:, None] * np.ones((1, 2), dtype=np.float32)
    out = kspace_truncate(img, scale, axes=(0,))
    centres = np.arange(n // scale) * scale + (scale - 1) / 2
    np.testing.assert_allclose(out[:, 0], np.cos(2 * np.pi * f * centres / n + 0.3), atol=1e-5)


def test_kspace_fraction_and_window_remove_outer_band_and_keep_dc() -> None:
    img = smooth_volume((64, 64, 2))
    plain = np.abs(np.fft.fft(kspace_truncate(img, 2, (0,)), axis=0))
    part = np.abs(np.fft.fft(kspace_truncate(img, 2, (0,), fraction=0.5), axis=0))
    k = np.abs(np.fft.fftfreq(32, 1 / 32))
    assert part[k > 8].max() < 1e-4 * part.max()
    np.testing.assert_allclose(part[k <= 8], plain[k <= 8], rtol=1e-3, atol=1e-4)
    for window in ("hann", "tukey"):
        out = kspace_truncate(img, 2, (0,), window=window)
        spectrum = np.abs(np.fft.fft(out, axis=0))
        assert out.mean() == pytest.approx(img.mean(), abs=1e-6)
        assert np.all(spectrum <= plain * (1 + 1e-3) + 1e-4)
        assert spectrum[k >= 12].sum() < 0.5 * plain[k >= 12].sum()


def test_kspace_truncate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        kspace_truncate(np.zeros((30, 32)), 4, (0,))
    with pytest.raises(ValueError, match="fraction"):
        kspace_truncate(np.zeros((32, 32)), 2, (0,), fraction=0.0)
    with pytest.raises(ValueError, match="window"):
        kspace_truncate(np.zeros((32, 32)), 2, (0,), window="kaiser")


# --------------------------------------------------------------------------------------------- PSF, slice profile


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("fwhm", [0.0, 1.0, 2.5])
def test_psf_downsample_of_constant_is_constant(scale: int, fwhm: float) -> None:
    img = np.full((40, 24, 3), 0.37, dtype=np.float32)
    out = gaussian_psf_downsample(img, scale, (0, 1), fwhm_lr_px=fwhm)
    assert out.shape == (40 // scale, 24 // scale, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.37, atol=1e-6)


def test_psf_downsample_zero_fwhm_is_block_mean() -> None:
    img = smooth_volume((8, 8, 1))
    out = gaussian_psf_downsample(img, 2, (0, 1), fwhm_lr_px=0.0)
    np.testing.assert_allclose(out, img.reshape(4, 2, 4, 2, 1).mean(axis=(1, 3)), atol=1e-6)


@pytest.mark.parametrize("profile", ["gaussian", "rect"])
@pytest.mark.parametrize(("factor", "thickness"), [(2, 2.0), (4, 4.0), (4, 5.0), (2, 3.0)])
def test_slice_profile_subsample_preserves_mean(profile: str, factor: int, thickness: float) -> None:
    vol = smooth_volume((16, 16, 64))
    out = slice_profile_subsample(vol, factor, axis=2, thickness_mm=thickness, spacing_mm=1.0, profile=profile)
    assert out.shape == (16, 16, 64 // factor) and out.dtype == np.float32
    assert out.mean() == pytest.approx(vol.mean(), rel=5e-3)
    constant = slice_profile_subsample(np.full_like(vol, 0.6), factor, 2, thickness, 1.0, profile)
    np.testing.assert_allclose(constant, 0.6, atol=1e-6)


def test_rect_profile_of_lr_spacing_is_block_mean() -> None:
    vol = smooth_volume((4, 4, 32))
    out = slice_profile_subsample(vol, 4, axis=2, thickness_mm=8.0, spacing_mm=2.0, profile="rect")
    np.testing.assert_allclose(out, vol.reshape(4, 4, 8, 4).mean(axis=3), atol=1e-6)
    assert out.mean() == pytest.approx(vol.mean(), abs=1e-6)


def test_slice_profile_blur_keeps_shape_and_mean_and_smooths() -> None:
    vol = np.random.default_rng(3).random((8, 8, 64)).astype(np.float32)
    out = slice_profile_blur(vol, axis=2, thickness_mm=3.0, spacing_mm=1.0)
    assert out.shape == vol.shape
    assert out.mean() == pytest.approx(vol.mean(), rel=5e-3)
    assert out.std() < 0.7 * vol.std()


# --------------------------------------------------------------------------------------------- noise


def test_rician_noise_on_zero_signal_is_rayleigh() -> None:
    sigma = 0.05
    noisy = add_rician_noise(np.zeros((400, 500), dtype=np.float32), sigma, np.random.default_rng(0))
    assert noisy.dtype == np.float32 and noisy.min() >= 0
    assert noisy.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.01)
    assert np.mean(noisy**2) == pytest.approx(2 * sigma**2, rel=0.01)


def test_rician_noise_at_high_snr_is_nearly_gaussian() -> None:
    noisy = add_rician_noise(np.full((400, 500), 0.8, dtype=np.float32), 0.01, np.random.default_rng(0))
    assert noisy.mean() == pytest.approx(0.8, abs=2e-4)
    assert noisy.std() == pytest.approx(0.01, rel=0.02)


def test_gaussian_noise_std() -> None:
    img = np.full((400, 500), 0.5, dtype=np.float32)
    noisy = add_gaussian_noise(img, 0.03, np.random.default_rng(0))
    assert noisy.dtype == np.float32
    assert noisy.mean() == pytest.approx(0.5, abs=5e-4)
    assert noisy.std() == pytest.approx(0.03, rel=0.01)


def test_poisson_like_noise_grows_with_signal() -> None:
    rng = np.random.default_rng(0)
    for level in (0.25, 1.0):
        noisy = add_poisson_like_noise(np.full((400, 500), level, dtype=np.float32), 0.04, rng)
        assert noisy.mean() == pytest.approx(level, abs=5e-4)
        assert noisy.std() == pytest.approx(0.04 * math.sqrt(level), rel=0.01)
    assert np.all(add_poisson_like_noise(np.zeros((10, 10)), 0.04, rng) == 0)


# --------------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("scale", [2, 4])
def test_degrade_inplane_shapes_and_crop(name: str, scale: int) -> None:
    hr = smooth_volume((37, 42, 6))
    hr_c, lr = degrade_inplane(hr, PRESETS[name], scale, SPACING, np.random.default_rng(0))
    x, y = 37 // scale, 42 // scale
    assert hr_c.shape == (x * scale, y * scale, 6) and lr.shape == (x, y, 6)
    assert hr_c.dtype == lr.dtype == np.float32
    assert 0.0 <= lr.min() and lr.max() <= 1.0
    ox, oy = (37 % scale) // 2, (42 % scale) // 2  # centre crop
    np.testing.assert_array_equal(hr_c, hr[ox : ox + x * scale, oy : oy + y * scale])


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("scale", [2, 4])
def test_degrade_throughplane_shapes_and_crop(name: str, scale: int) -> None:
    hr = smooth_volume((20, 18, 27))
    hr_c, lr = degrade_throughplane(hr, PRESETS[name], scale, (0.8, 0.8, 1.2), np.random.default_rng(0))
    z = 27 // scale
    assert hr_c.shape == (20, 18, z * scale) and lr.shape == (20, 18, z)
    assert 0.0 <= lr.min() and lr.max() <= 1.0
    oz = (27 % scale) // 2
    np.testing.assert_array_equal(hr_c, hr[:, :, oz : oz + z * scale])


@pytest.mark.parametrize("degrade", [degrade_inplane, degrade_throughplane])
def test_degrade_is_deterministic_given_the_rng_seed(degrade) -> None:
    hr = smooth_volume((32, 32, 16))
    profile = PRESETS["mr-1.5t-kspace"]
    _, a = degrade(hr, profile, 2, SPACING, np.random.default_rng(7))
    _, b = degrade(hr, profile, 2, SPACING, np.random.default_rng(7))
    _, c = degrade(hr, profile, 2, SPACING, np.random.default_rng(8))
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)


def test_noise_free_inplane_pipeline_matches_its_primitives() -> None:
    hr = smooth_volume((32, 32, 8))
    kspace = dataclasses.replace(PRESETS["mr-3t-kspace"], noise="none")
    _, lr = degrade_inplane(hr, kspace, 4, SPACING, np.random.default_rng(0))
    np.testing.assert_allclose(lr, np.clip(kspace_truncate(hr, 4, (0, 1)), 0, 1), atol=1e-6)
    thick = AcquisitionProfile("t", "MR", inplane="psf", slice_thickness_mm=3.0, noise="none")
    _, lr = degrade_inplane(hr, thick, 2, (1.0, 1.0, 1.5), np.random.default_rng(0))
    expected = gaussian_psf_downsample(slice_profile_blur(hr, 2, 3.0, 1.5), 2, (0, 1), 1.0)
    np.testing.assert_allclose(lr, np.clip(expected, 0, 1), atol=1e-6)


@pytest.mark.parametrize("scale", [1, 3, 8, 2.0, True])
def test_degrade_rejects_unsupported_scale(scale) -> None:
    hr = smooth_volume((16, 16, 8))
    for degrade in (degrade_inplane, degrade_throughplane):
        with pytest.raises(ValueError, match="one of 2, 4"):
            degrade(hr, PRESETS["mr-psf"], scale, SPACING, np.random.default_rng(0))


def test_degrade_rejects_bad_volumes() -> None:
    with pytest.raises(ValueError, match="X, Y, Z"):
        degrade_inplane(np.zeros((16, 16)), PRESETS["mr-psf"], 2, SPACING, np.random.default_rng(0))
    with pytest.raises(ValueError, match="fewer than"):
        degrade_throughplane(np.zeros((16, 16, 3)), PRESETS["mr-psf"], 4, SPACING, np.random.default_rng(0))


@pytest.mark.parametrize("name", ["mr-1.5t-kspace", "mr-psf"])
def test_inplane_degradation_of_a_typical_volume(name: str) -> None:
    """Shapes and range on a typical volume; its speed is measured by ``benchmarks/speed_checks.py``."""
    hr = np.random.default_rng(0).random((128, 128, 64), dtype=np.float32)
    hr_out, lr = degrade_inplane(hr, PRESETS[name], 4, SPACING, np.random.default_rng(0))
    assert hr_out.shape == (128, 128, 64) and lr.shape == (32, 32, 64) and lr.dtype == np.float32
    assert 0.0 <= lr.min() and lr.max() <= 1.0


# --------------------------------------------------------------------------------------------- config


def test_profile_from_config_defaults_and_presets() -> None:
    assert profile_from_config({}, "MR") == PRESETS["mr-3t-kspace"]
    assert profile_from_config(None, "ct") == PRESETS["ct-standard"]
    assert profile_from_config({"profile": "mr-psf"}, "MR") == PRESETS["mr-psf"]


def test_profile_from_config_overrides_fields() -> None:
    profile = profile_from_config(
        {"profile": "mr-1.5t-kspace", "noise_level": 0.05, "kspace_window": "hann", "slice_thickness_mm": 0}, "MR"
    )
    assert profile.noise_level == 0.05 and profile.kspace_window == "hann"
    assert profile.slice_thickness_mm is None  # 0 = thin
    assert profile.kspace_fraction == PRESETS["mr-1.5t-kspace"].kspace_fraction
    assert profile.name.startswith("mr-1.5t-kspace[") and "noise_level=0.05" in profile.name
    assert profile_from_config({"slice_thickness_mm": 3}, "MR").slice_thickness_mm == 3.0


def test_profile_from_config_errors() -> None:
    with pytest.raises(ValueError, match=r"'noise_sigma'.*known keys: profile, inplane, .*noise_level"):
        profile_from_config({"noise_sigma": 0.1}, "MR")
    with pytest.raises(ValueError, match=r"'mr-7t'.*mr-3t-kspace"):
        profile_from_config({"profile": "mr-7t"}, "MR")
    with pytest.raises(ValueError, match="for CT but the site's modality is MR"):
        profile_from_config({"profile": "ct-lowdose"}, "MR")
    with pytest.raises(ValueError, match="kspace_fraction"):
        profile_from_config({"kspace_fraction": 1.5}, "MR")
    with pytest.raises(ValueError, match="noise = 'speckle'"):
        profile_from_config({"noise": "speckle"}, "MR")
    with pytest.raises(ValueError, match="must be a number"):
        profile_from_config({"noise_level": "high"}, "MR")
    with pytest.raises(ValueError, match="modality"):
        profile_from_config({}, "PET")
