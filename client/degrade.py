"""Acquisition models: make the low-resolution (LR) image a scanner would record from a high-resolution (HR) one.

Grid convention (shared with ``shared_models.resample.upsample_baseline``, ``align_corners=False``): LR sample ``i``
along a reduced axis sits at HR coordinate ``i * scale + (scale - 1) / 2``, the centre of the block of ``scale`` HR
voxels it replaces. Every operator here follows it, so bicubic/trilinear upsampling of any LR image lines up with
its HR image whichever acquisition model made it.

All functions are pure: float32 in, float32 out, randomness only from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import gaussian_filter1d
from scipy.special import erf

SCALES = (2, 4)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
INPLANE_MODELS = ("kspace", "psf")
KSPACE_WINDOWS = ("none", "hann", "tukey")
SLICE_PROFILES = ("gaussian", "rect")
NOISE_MODELS = ("rician", "gaussian", "poisson", "none")
MODALITIES = ("MR", "CT")
TUKEY_ALPHA = 0.5  # fraction of the kept band that the Tukey window tapers (outer half)


# --------------------------------------------------------------------------------------------- primitives


def kspace_truncate(
    img: np.ndarray,
    scale: int,
    axes: Sequence[int],
    fraction: float = 1.0,
    window: str = "none",
) -> np.ndarray:
    """Keep the central ``1/scale`` of k-space along ``axes`` and reconstruct on the LR grid (MR acquisition).

    Along each axis of length ``n`` (a multiple of ``scale``) the LR image has ``m = n / scale`` samples and its
    DFT is ``G[k] = (m / n) * F[k] * w(k) * exp(2j * pi * k * (scale - 1) / (2 * n))`` for the LR frequencies
    ``k = -m/2 .. m/2 - 1``, ``F`` the HR DFT. The ``m / n`` factor preserves intensities (the mean is exact), the
    phase ramp puts LR samples at block centres (module docstring), ``w`` is the optional extra truncation and
    apodisation. The LR Nyquist bin is made Hermitian (average of the two HR bins at +-m/2) so the image is real.

    Args:
        img: float array of any rank; each axis in ``axes`` must be a multiple of ``scale``.
        scale: positive integer reduction factor.
        axes: axes to reduce (e.g. ``(0, 1)`` for in-plane).
        fraction: fraction of the LR band kept, in (0, 1]; frequencies with ``|k| > fraction * m / 2`` are zeroed
            (partial acquisition of the LR matrix). 1.0 = plain truncation.
        window: ``"none"`` (box), ``"hann"`` or ``"tukey"`` (alpha 0.5) apodisation over the kept band; DC weight 1.

    Returns:
        float32 array with ``n / scale`` samples along each axis in ``axes``.
    """
    scale = _check_factor(scale)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"k-space fraction must be in (0, 1], got {fraction!r}")
    if window not in KSPACE_WINDOWS:
        raise ValueError(f"unknown k-space window {window!r}; known: {', '.join(KSPACE_WINDOWS)}")
    out = np.asarray(img, dtype=np.float32)
    for axis in _normalise_axes(axes, out.ndim):
        n = _check_divisible(out.shape[axis], scale, axis)
        m = n // scale
        k = sfft.fftfreq(m, 1.0 / m)  # integer LR frequencies in DFT order
        weights = (m / n) * _kspace_window(np.abs(k) / (m / 2.0), fraction, window)
        weights = weights * np.exp(2j * np.pi * k * (scale - 1) / (2.0 * n))
        spectrum = np.take(sfft.fft(out, axis=axis), k.astype(np.intp) % n, axis=axis)
        spectrum *= _along(weights.astype(np.complex64), axis, out.ndim)
        out = sfft.ifft(spectrum, axis=axis).real.astype(np.float32)
    return out


def gaussian_psf_downsample(
    img: np.ndarray, scale: int, axes: Sequence[int], fwhm_lr_px: float = 1.0
) -> np.ndarray:
    """Blur with a Gaussian PSF, then integrate over each LR pixel (mean of ``scale`` HR pixels) along ``axes``.

    Args:
        img: float array; each axis in ``axes`` a multiple of ``scale``.
        scale: positive integer reduction factor.
        axes: axes to reduce.
        fwhm_lr_px: FWHM of the optical PSF in LR pixels (0 = pixel integration only, i.e. block mean).

    Returns:
        float32 array reduced by ``scale`` along ``axes``; a constant image stays that constant.
    """
    scale = _check_factor(scale)
    if fwhm_lr_px < 0:
        raise ValueError(f"PSF FWHM must be >= 0 LR pixels, got {fwhm_lr_px!r}")
    out = np.asarray(img, dtype=np.float32)
    sigma_hr = fwhm_lr_px * scale / FWHM_PER_SIGMA
    for axis in _normalise_axes(axes, out.ndim):
        n = _check_divisible(out.shape[axis], scale, axis)
        if sigma_hr > 0:
            out = gaussian_filter1d(out, sigma_hr, axis=axis, mode="reflect", truncate=3.0)
        blocks = out.shape[:axis] + (n // scale, scale) + out.shape[axis + 1 :]
        out = out.reshape(blocks).mean(axis=axis + 1, dtype=np.float32)
    return out


def slice_profile_subsample(
    vol: np.ndarray,
    factor: int,
    axis: int,
    thickness_mm: float,
    spacing_mm: float,
    profile: str = "gaussian",
) -> np.ndarray:
    """Acquire thick slices every ``factor`` voxels along ``axis`` (through-plane acquisition).

    Each LR slice is the HR volume weighted by the slice profile (FWHM = ``thickness_mm``) centred on its block
    centre; each HR voxel's weight is the profile integrated over that voxel, normalised to sum 1. Constants are
    preserved exactly and the mean up to boundary effects (half-sample symmetric extension); a ``"rect"`` profile of
    thickness ``factor * spacing_mm`` is exactly the block mean.

    Args:
        vol: float array; ``vol.shape[axis]`` a multiple of ``factor``.
        factor: positive integer subsampling factor (1 = blur only).
        axis: slice axis.
        thickness_mm: slice thickness (profile FWHM / rect width), mm, > 0.
        spacing_mm: HR voxel spacing along ``axis``, mm, > 0.
        profile: ``"gaussian"`` or ``"rect"``.

    Returns:
        float32 array with ``shape[axis] / factor`` slices.
    """
    factor = _check_factor(factor)
    if thickness_mm <= 0 or spacing_mm <= 0:
        raise ValueError(f"slice thickness and spacing must be > 0 mm, got {thickness_mm!r} and {spacing_mm!r}")
    if profile not in SLICE_PROFILES:
        raise ValueError(f"unknown slice profile {profile!r}; known: {', '.join(SLICE_PROFILES)}")
    vol = np.asarray(vol, dtype=np.float32)
    (axis,) = _normalise_axes((axis,), vol.ndim)
    n = _check_divisible(vol.shape[axis], factor, axis)
    offsets, weights = _profile_weights(thickness_mm / spacing_mm, profile, (factor - 1) / 2.0)
    starts = np.arange(n // factor) * factor
    out = np.zeros(vol.shape[:axis] + (n // factor,) + vol.shape[axis + 1 :], dtype=np.float32)
    for offset, weight in zip(offsets, weights, strict=True):
        out += np.float32(weight) * np.take(vol, _reflect_index(starts + offset, n), axis=axis)
    return out


def slice_profile_blur(
    vol: np.ndarray, axis: int, thickness_mm: float, spacing_mm: float, profile: str = "gaussian"
) -> np.ndarray:
    """Blur along ``axis`` with the slice profile (FWHM ``thickness_mm``) without subsampling; shape unchanged."""
    return slice_profile_subsample(vol, 1, axis, thickness_mm, spacing_mm, profile)


def add_rician_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (std ``sigma`` per channel): MR magnitude images.

    Zero signal gives Rayleigh noise with mean ``sigma * sqrt(pi / 2)``.
    """
    img = np.asarray(img, dtype=np.float32)
    real = img + _normal(rng, img.shape, sigma)
    imag = _normal(rng, img.shape, sigma)
    return np.hypot(real, imag, dtype=np.float32)


def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise with std ``sigma`` (same units as ``img``)."""
    img = np.asarray(img, dtype=np.float32)
    return img + _normal(rng, img.shape, sigma)


def add_poisson_like_noise(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Signal-dependent Gaussian noise (Gaussian limit of Poisson counts): std ``level * sqrt(max(img, 0))``.

    ``level`` is the noise std at intensity 1.0 (CT: quantum noise grows with the signal's count statistics).
    """
    img = np.asarray(img, dtype=np.float32)
    return img + np.sqrt(np.maximum(img, 0.0)) * _normal(rng, img.shape, level)


# --------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class AcquisitionProfile:
    """How one site's scanner turns anatomy into an LR image (all levels in normalised [0, 1] units).

    Attributes:
        name: preset name (plus ``[key=value,...]`` when a site overrides fields).
        modality: ``"MR"`` or ``"CT"``.
        inplane: ``"kspace"`` (central k-space truncation) or ``"psf"`` (Gaussian PSF + pixel integration).
        kspace_fraction: fraction of the LR k-space band kept, in (0, 1]; 1.0 = plain truncation.
        kspace_window: apodisation of the kept band: ``"none"``, ``"hann"`` or ``"tukey"``.
        psf_fwhm_lr_px: Gaussian PSF FWHM in LR pixels (``inplane="psf"``), >= 0.
        slice_thickness_mm: slice thickness in mm; ``None`` = thin (no through-plane blur in-plane; contiguous
            slices through-plane).
        slice_profile: ``"gaussian"`` or ``"rect"`` slice profile.
        noise: ``"rician"`` (MR magnitude), ``"gaussian"``, ``"poisson"`` (signal-dependent, CT) or ``"none"``.
        noise_level: noise std in normalised units (for ``"poisson"``: std at intensity 1), >= 0.
    """

    name: str
    modality: str
    inplane: str = "kspace"
    kspace_fraction: float = 1.0
    kspace_window: str = "none"
    psf_fwhm_lr_px: float = 1.0
    slice_thickness_mm: float | None = None
    slice_profile: str = "gaussian"
    noise: str = "rician"
    noise_level: float = 0.0

    def __post_init__(self) -> None:
        choices = {
            "modality": MODALITIES,
            "inplane": INPLANE_MODELS,
            "kspace_window": KSPACE_WINDOWS,
            "slice_profile": SLICE_PROFILES,
            "noise": NOISE_MODELS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"acquisition profile {self.name!r}: {field} = {getattr(self, field)!r} is not one of "
                    f"{', '.join(allowed)}"
                )
        if not 0.0 < self.kspace_fraction <= 1.0:
            raise ValueError(f"acquisition profile {self.name!r}: kspace_fraction must be in (0, 1]")
        if self.psf_fwhm_lr_px < 0 or self.noise_level < 0:
            raise ValueError(f"acquisition profile {self.name!r}: psf_fwhm_lr_px and noise_level must be >= 0")
        if self.slice_thickness_mm is not None and self.slice_thickness_mm <= 0:
            raise ValueError(f"acquisition profile {self.name!r}: slice_thickness_mm must be > 0 (or absent = thin)")


PRESETS: dict[str, AcquisitionProfile] = {
    p.name: p
    for p in (
        AcquisitionProfile("mr-3t-kspace", "MR", inplane="kspace", noise="rician", noise_level=0.01),
        AcquisitionProfile(
            "mr-1.5t-kspace",
            "MR",
            inplane="kspace",
            kspace_fraction=0.9,
            kspace_window="tukey",
            slice_thickness_mm=2.0,
            noise="rician",
            noise_level=0.025,
        ),
        AcquisitionProfile("mr-psf", "MR", inplane="psf", psf_fwhm_lr_px=1.2, noise="rician", noise_level=0.015),
        AcquisitionProfile(
            "mr-thick-slice", "MR", inplane="kspace", slice_thickness_mm=3.0, noise="rician", noise_level=0.015
        ),
        AcquisitionProfile("ct-standard", "CT", inplane="psf", psf_fwhm_lr_px=1.0, noise="poisson", noise_level=0.01),
        AcquisitionProfile(
            "ct-lowdose", "CT", inplane="psf", psf_fwhm_lr_px=1.0, slice_thickness_mm=2.0, noise="poisson",
            noise_level=0.04,
        ),
    )
}
DEFAULT_PRESET = {"MR": "mr-3t-kspace", "CT": "ct-standard"}
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(AcquisitionProfile) if f.name not in ("name", "modality"))


def profile_from_config(cfg: Mapping[str, object] | None, modality: str) -> AcquisitionProfile:
    """Build a site's profile from its ``site.toml`` ``[acquisition]`` table.

    ``profile`` names a preset (default per modality: ``DEFAULT_PRESET``); every other key overrides that field.
    ``slice_thickness_mm = 0`` means thin slices (TOML has no null).

    Raises:
        ValueError: unknown key (named, with the known keys), unknown preset, preset of another modality, or a
            value of the wrong type / out of range.
    """
    modality = str(modality).upper()
    if modality not in DEFAULT_PRESET:
        raise ValueError(f"unknown modality {modality!r}; known: {', '.join(DEFAULT_PRESET)}")
    overrides = dict(cfg or {})
    preset = overrides.pop("profile", DEFAULT_PRESET[modality])
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(
            f"unknown [acquisition] key {unknown[0]!r} in site.toml; known keys: profile, {', '.join(OVERRIDABLE)}"
        )
    if preset not in PRESETS:
        raise ValueError(f"unknown acquisition profile {preset!r} in site.toml; known: {', '.join(PRESETS)}")
    base = PRESETS[preset]
    if base.modality != modality:
        raise ValueError(f"acquisition profile {preset!r} is for {base.modality} but the site's modality is {modality}")
    values = {key: _coerce_field(key, value) for key, value in overrides.items()}
    name = preset if not values else f"{preset}[{','.join(f'{k}={overrides[k]}' for k in sorted(values))}]"
    return dataclasses.replace(base, name=name, **values)


# --------------------------------------------------------------------------------------------- pipelines


def degrade_inplane(
    hr: np.ndarray,
    profile: AcquisitionProfile,
    scale: int,
    spacing: Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthesise the LR scan for in-plane SR: slice-thickness blur, in-plane acquisition, noise.

    Args:
        hr: float (X, Y, Z) volume in [0, 1].
        profile: the site's acquisition model.
        scale: 2 or 4, applied to X and Y.
        spacing: HR voxel size (X, Y, Z) in mm (Z spacing scales the slice-thickness blur).
        rng: source of the noise.

    Returns:
        ``(hr_cropped, lr)``: float32 ``(scale * X', scale * Y', Z)`` (centre crop so X, Y are multiples of scale)
        and float32 ``(X', Y', Z)`` clipped to [0, 1].
    """
    scale = _check_scale(scale)
    hr = _check_volume(hr, spacing)
    if min(hr.shape[:2]) < scale:
        raise ValueError(f"in-plane size {hr.shape[:2]} is smaller than the scale factor {scale}")
    hr = _centre_crop(hr, scale, (0, 1))
    lr = hr
    if profile.slice_thickness_mm is not None:
        lr = slice_profile_blur(lr, 2, profile.slice_thickness_mm, float(spacing[2]), profile.slice_profile)
    if profile.inplane == "kspace":
        lr = kspace_truncate(lr, scale, (0, 1), profile.kspace_fraction, profile.kspace_window)
    else:
        lr = gaussian_psf_downsample(lr, scale, (0, 1), profile.psf_fwhm_lr_px)
    return hr, _finish(lr, profile, rng)


def degrade_throughplane(
    hr: np.ndarray,
    profile: AcquisitionProfile,
    scale: int,
    spacing: Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthesise the LR scan for through-plane SR: thick slices every ``scale`` voxels along Z, then noise.

    Slices are contiguous (thickness = LR slice spacing ``scale * spacing[2]``) unless the profile's
    ``slice_thickness_mm`` is larger.

    Returns:
        ``(hr_cropped, lr)``: float32 ``(X, Y, scale * Z')`` (centre crop along Z) and float32 ``(X, Y, Z')``
        clipped to [0, 1].
    """
    scale = _check_scale(scale)
    hr = _check_volume(hr, spacing)
    if hr.shape[2] < scale:
        raise ValueError(f"{hr.shape[2]} slices are fewer than the through-plane scale factor {scale}")
    hr = _centre_crop(hr, scale, (2,))
    thickness = max(profile.slice_thickness_mm or 0.0, scale * float(spacing[2]))
    lr = slice_profile_subsample(hr, scale, 2, thickness, float(spacing[2]), profile.slice_profile)
    return hr, _finish(lr, profile, rng)


def degrade_isotropic(
    hr: np.ndarray,
    profile: AcquisitionProfile,
    scale: int,
    spacing: Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthesise the LR scan for 3D SR: the in-plane acquisition, thick slices every ``scale`` voxels, noise once.

    Returns:
        ``(hr_cropped, lr)``: float32 ``(scale * X', scale * Y', scale * Z')`` (centre crop on every axis) and
        float32 ``(X', Y', Z')`` clipped to [0, 1].
    """
    scale = _check_scale(scale)
    hr = _check_volume(hr, spacing)
    if min(hr.shape) < scale:
        raise ValueError(f"volume {hr.shape} is smaller than the scale factor {scale} on some axis")
    hr = _centre_crop(hr, scale, (0, 1, 2))
    if profile.inplane == "kspace":
        lr = kspace_truncate(hr, scale, (0, 1), profile.kspace_fraction, profile.kspace_window)
    else:
        lr = gaussian_psf_downsample(hr, scale, (0, 1), profile.psf_fwhm_lr_px)
    thickness = max(profile.slice_thickness_mm or 0.0, scale * float(spacing[2]))
    lr = slice_profile_subsample(lr, scale, 2, thickness, float(spacing[2]), profile.slice_profile)
    return hr, _finish(lr, profile, rng)


# --------------------------------------------------------------------------------------------- helpers

_NOISE: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "rician": add_rician_noise,
    "gaussian": add_gaussian_noise,
    "poisson": add_poisson_like_noise,
}


def _finish(lr: np.ndarray, profile: AcquisitionProfile, rng: np.random.Generator) -> np.ndarray:
    """Add the profile's noise and clip to the normalised range (as the intensity window of a real scan does)."""
    if profile.noise != "none" and profile.noise_level > 0:
        lr = _NOISE[profile.noise](lr, profile.noise_level, rng)
    return np.clip(lr, 0.0, 1.0).astype(np.float32, copy=False)


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale not in SCALES:
        raise ValueError(f"scale factor must be one of {', '.join(map(str, SCALES))}, got {scale!r}")
    return int(scale)


def _check_factor(factor: int) -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"reduction factor must be a positive integer, got {factor!r}")
    return int(factor)


def _check_volume(hr: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    hr = np.asarray(hr, dtype=np.float32)
    if hr.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {hr.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm, got {tuple(spacing)!r}")
    return hr


def _check_divisible(n: int, factor: int, axis: int) -> int:
    if n % factor:
        raise ValueError(f"axis {axis} has {n} samples, not a multiple of {factor}; crop first")
    return n


def _normalise_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    out = tuple(sorted({int(a) % ndim for a in axes if -ndim <= int(a) < ndim}))
    if len(out) != len(tuple(axes)):
        raise ValueError(f"axes {tuple(axes)} are invalid or repeated for a {ndim}-D array")
    return out


def _along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a 1-D array so that it broadcasts along ``axis`` of an ``ndim``-D array."""
    shape = [1] * ndim
    shape[axis] = vector.size
    return vector.reshape(shape)


def _centre_crop(vol: np.ndarray, multiple: int, axes: Sequence[int]) -> np.ndarray:
    """Centre-crop ``axes`` to the largest multiple of ``multiple``; returns a contiguous copy."""
    index = [slice(None)] * vol.ndim
    for axis in axes:
        extra = vol.shape[axis] % multiple
        index[axis] = slice(extra // 2, vol.shape[axis] - (extra - extra // 2))
    return np.ascontiguousarray(vol[tuple(index)])


def _kspace_window(radius: np.ndarray, fraction: float, window: str) -> np.ndarray:
    """Weights at normalised LR frequency ``radius`` (1 = LR Nyquist): zero beyond ``fraction``, 1 at DC."""
    r = radius / fraction
    if window == "hann":
        w = 0.5 * (1.0 + np.cos(np.pi * np.minimum(r, 1.0)))
    elif window == "tukey":
        taper = np.clip((r - (1.0 - TUKEY_ALPHA)) / TUKEY_ALPHA, 0.0, 1.0)
        w = 0.5 * (1.0 + np.cos(np.pi * taper))
    else:
        w = np.ones_like(r)
    return np.where(r <= 1.0, w, 0.0)


def _profile_weights(width_vox: float, profile: str, centre: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer voxel offsets and normalised weights of a slice profile of FWHM ``width_vox`` centred at ``centre``."""
    if profile == "gaussian":
        sigma = width_vox / FWHM_PER_SIGMA
        reach = 4.0 * sigma + 1.0

        def cdf(z: np.ndarray) -> np.ndarray:
            return 0.5 * (1.0 + erf(z / (sigma * math.sqrt(2.0))))

    else:
        reach = width_vox / 2.0 + 1.0

        def cdf(z: np.ndarray) -> np.ndarray:
            return np.clip(z / width_vox + 0.5, 0.0, 1.0)

    offsets = np.arange(math.floor(centre - reach), math.ceil(centre + reach) + 1)
    weights = cdf(offsets + 0.5 - centre) - cdf(offsets - 0.5 - centre)
    keep = weights > 1e-7
    return offsets[keep], weights[keep] / weights[keep].sum()


def _reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Map indices outside [0, n) by half-sample symmetric reflection (edge voxel repeated)."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    if sigma < 0:
        raise ValueError(f"noise level must be >= 0, got {sigma!r}")
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _coerce_field(key: str, value: object) -> object:
    """Check and convert one ``[acquisition]`` override to the field's type."""
    field_type = {f.name: f.type for f in dataclasses.fields(AcquisitionProfile)}[key]
    if field_type == "str":
        if not isinstance(value, str):
            raise ValueError(f"[acquisition] {key} must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"[acquisition] {key} must be a number, got {value!r}")
    if key == "slice_thickness_mm" and value == 0:
        return None
    return float(value)
