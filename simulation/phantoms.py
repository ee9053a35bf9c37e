"""Procedural brain-like phantoms and phantom hospital sites, each with its own scanner "look".

Anatomy (``make_phantom``): per-voxel tissue fractions with partial-volume boundaries: scalp, skull, outer CSF,
folded cortex with thin sulci and an interhemispheric fissure, white matter, ventricles, deep grey nuclei, small
lesions and thin tortuous vessels. Appearance (``render``): a scanner look maps tissues to intensities (T1-, T2- or
PD-like), adds fine tissue texture, a smooth bias field and a little Rician noise. ``write_phantom_sites`` writes site
folders in the format of real sites (NIfTI + ``site.toml``) whose acquisition profiles differ, so the federation
sees a real domain shift.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.fft as sfft
import tomli_w
from scipy import ndimage

from client.degrade import PRESETS
from shared_models.atomic import atomic_write

log = logging.getLogger(__name__)

TISSUES = ("background", "scalp", "skull", "csf", "grey_matter", "white_matter", "deep_grey", "lesion", "vessel")

# Relative intensity of each tissue (order of TISSUES) per contrast; 1.0 = brightest tissue.
CONTRASTS: dict[str, tuple[float, ...]] = {
    "T1": (0.0, 0.80, 0.07, 0.10, 0.45, 0.75, 0.56, 0.28, 0.90),
    "T2": (0.0, 0.45, 0.04, 1.00, 0.58, 0.38, 0.50, 0.85, 0.08),
    "PD": (0.0, 0.70, 0.05, 0.82, 0.70, 0.55, 0.65, 0.78, 0.20),
}
# Gaussian sigma (voxels) of the HR scan's own point-spread function (FWHM ~1.4 voxels, as for a 1 mm MPRAGE).
HR_PSF_SIGMA_VOXELS = 0.6

# Amplitude of the multiplicative fine texture per tissue (order of TISSUES).
TEXTURE = (0.0, 0.04, 0.05, 0.01, 0.03, 0.025, 0.025, 0.04, 0.0)

#: Subjects (one scan each, each its own patient) per phantom site by default, and its [split] fractions.
#: 8 split 4 train / 1 val / 3 test: the fewest that keep the 4 training scans of the former 6 subjects and
#: add the 3 test scans an interval needs (client.data.site.MIN_TEST_SCANS).
SUBJECTS_PER_SITE = 8
SPLIT_FRACTIONS = (0.5, 0.125, 0.375)


@dataclass(frozen=True)
class ScannerLook:
    """How one site's scanner renders anatomy and acquires its LR scans.

    Attributes:
        scanner: human-readable scanner, e.g. ``"Siemens 3T"`` (also gives the site-folder slug).
        contrast: tissue intensities (order of ``TISSUES``), relative, in [0, 1].
        bias_strength: amplitude of the smooth log bias field (its std over the volume is about 0.7 x this).
        gain: scanner units per normalised unit (MR intensities are arbitrary; sites differ).
        hr_noise: Rician noise sigma of the HR scan itself, normalised units.
        preset: ``client.degrade.PRESETS`` key of the site's LR acquisition.
        overrides: ``[acquisition]`` overrides written to ``site.toml`` next to the preset.
    """

    scanner: str
    contrast: tuple[float, ...]
    bias_strength: float
    gain: float
    hr_noise: float
    preset: str
    overrides: Mapping[str, float] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return self.scanner.lower().replace(" ", "-")


LOOKS = (
    ScannerLook("Siemens 3T", CONTRASTS["T1"], bias_strength=0.12, gain=1000.0, hr_noise=0.004, preset="mr-3t-kspace"),
    ScannerLook("GE 1.5T", CONTRASTS["T2"], bias_strength=0.06, gain=4095.0, hr_noise=0.006, preset="mr-1.5t-kspace",
        overrides={"kspace_window": "none", "noise_level": 0.02},
    ),
    ScannerLook(
        "Philips 3T", CONTRASTS["PD"], bias_strength=0.10, gain=2500.0, hr_noise=0.005, preset="mr-3t-kspace",
        overrides={"slice_thickness_mm": 1.5, "noise_level": 0.015},
    ),
)


def site_look(index: int, seed: int = 0) -> ScannerLook:
    """The look of site ``index`` (0-based): the base looks in turn, varied on every further cycle.

    From the second cycle on, the contrast is jittered (+-8 %), the bias field is stronger and the LR noise level
    higher, so every site of a federation has a distinct acquisition profile.
    """
    base = LOOKS[index % len(LOOKS)]
    cycle = index // len(LOOKS)
    if cycle == 0:
        return base
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x100C]))
    contrast = np.clip(np.asarray(base.contrast) * (1.0 + 0.08 * rng.standard_normal(len(TISSUES))), 0.0, 1.0)
    contrast[0] = 0.0
    noise = base.overrides.get("noise_level", PRESETS[base.preset].noise_level) * (1.0 + 0.5 * cycle)
    return dataclasses.replace(
        base,
        contrast=tuple(round(float(c), 3) for c in contrast),
        bias_strength=base.bias_strength * (1.0 + 0.25 * cycle),
        overrides={**base.overrides, "noise_level": round(noise, 4)},
    )


# --------------------------------------------------------------------------------------------- anatomy


def make_phantom(shape: Sequence[int] = (96, 96, 48), seed: int = 0) -> np.ndarray:
    """Procedural head: tissue fractions per voxel, 1 mm isotropic voxels.

    Args:
        shape: (X, Y, Z) in voxels, each >= 16; the head fills the X-Y field of view, Z cuts an axial slab.
        seed: anatomy seed (same seed -> identical array).

    Returns:
        float32 ``(len(TISSUES), X, Y, Z)`` fractions in [0, 1] summing to 1 per voxel.
    """
    shape = _check_shape(shape)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xB7A1]))
    x, y, z = _centred_grid(shape)
    half = [n / 2.0 for n in shape]
    jitter = 1.0 + 0.04 * rng.standard_normal(3)
    radii = [float(r * j) for r, j in zip((0.80 * half[0], 0.92 * half[1], 0.88 * max(half[:2])), jitter, strict=True)]
    angle = np.deg2rad(8.0) * rng.uniform(-1.0, 1.0)
    xr = math.cos(angle) * x + math.sin(angle) * y
    yr = math.cos(angle) * y - math.sin(angle) * x
    z = z + 0.1 * half[2]  # the slab sits a little above the head's centre
    rho = np.sqrt((xr / radii[0]) ** 2 + (yr / radii[1]) ** 2 + (z / radii[2]) ** 2)
    rho *= 1.0 + 0.025 * _random_field(rng, shape, 12.0)
    vox_per_rho = math.prod(radii) ** (1.0 / 3.0)  # voxels per unit of rho (geometric mean radius)

    # Nested shells, thickness in rho units with a little per-subject variation.
    shells = np.cumsum(np.array([0.07, 0.07, 0.04]) * (1.0 + 0.1 * rng.standard_normal(3)))  # scalp, skull, CSF
    skull_out, skull_in, pial = (1.0 - float(t) for t in shells)
    head = _partial((1.0 - rho) * vox_per_rho)
    outer = _partial((skull_out - rho) * vox_per_rho)
    inner = _partial((skull_in - rho) * vox_per_rho)
    brain = _partial((pial - rho) * vox_per_rho)
    depth = (pial - rho) * vox_per_rho  # voxels below the pial surface

    # Sulci: thin sheets on the zero set of a band-limited field, reaching a varying depth; plus the midline fissure.
    sulcus_depth = np.clip(7.0 + 2.5 * _random_field(rng, shape, 10.0), 3.0, 12.0)
    to_sulcus = np.hypot(_distance_to_zero_set(_random_field(rng, shape, 2.2)), np.maximum(depth - sulcus_depth, 0.0))
    fissure = np.hypot(np.abs(xr - 0.5 * rng.standard_normal()), np.maximum(depth - 0.35 * vox_per_rho, 0.0))
    to_sulcus = np.minimum(to_sulcus, fissure)
    sulci = _partial(0.45 + 0.15 * rng.uniform() - to_sulcus)
    cortex = 2.5 + 0.4 * _random_field(rng, shape, 8.0)  # grey-matter thickness in voxels
    white = _partial(np.minimum(depth, to_sulcus) - cortex)

    # Deep structures (voxel units): lateral ventricles and deep grey nuclei, mirrored left/right.
    vent_size = rng.uniform(0.8, 1.4)
    coords = (xr, yr, z)
    ventricles = _mirrored_ellipsoids(
        coords, np.multiply((0.13, -0.05, 0.05), radii), np.multiply((0.07 * vent_size, 0.33, 0.13 * vent_size), radii)
    )
    nuclei = _mirrored_ellipsoids(coords, np.multiply((0.30, 0.05, 0.0), radii), np.multiply((0.10, 0.16, 0.12), radii))
    lesions = _lesions(rng, shape, (white > 0.99) & (depth > 6.0))

    # Vessels: thin tubes along the intersection curves of two smooth fields, in part of the brain only.
    tube = np.hypot(*(_distance_to_zero_set(_random_field(rng, shape, 5.0)) for _ in range(2)))
    vessels = _partial(0.7 - tube) * np.clip(_random_field(rng, shape, 8.0) + 0.5, 0.0, 1.0)

    parts = {"background": 1.0 - head, "scalp": head - outer, "skull": outer - inner}
    remaining = brain  # brain tissue still unassigned; each structure takes its share in turn
    carved = {}
    for name, mask in (
        ("vessel", vessels),
        ("ventricles", ventricles),
        ("lesion", lesions * white),
        ("deep_grey", nuclei),
        ("sulci", sulci),
        ("white_matter", white),
    ):
        carved[name] = remaining * mask
        remaining = remaining - carved[name]
    parts["csf"] = inner - brain + carved.pop("ventricles") + carved.pop("sulci")
    parts.update(carved, grey_matter=remaining)
    fractions = np.stack([parts[name] for name in TISSUES]).astype(np.float32, copy=False)
    return np.clip(fractions, 0.0, 1.0, out=fractions)


def render(fractions: np.ndarray, look: ScannerLook, seed: int = 0) -> np.ndarray:
    """Image a phantom with a scanner look: tissue contrast x (1 + texture) x bias field, Rician noise, gain.

    Args:
        fractions: ``(len(TISSUES), X, Y, Z)`` from ``make_phantom``.
        look: the scanner's look.
        seed: seed of the texture, bias field and noise.

    Returns:
        float32 (X, Y, Z) in integer-valued scanner units (``look.gain`` per normalised unit).
    """
    if fractions.ndim != 4 or fractions.shape[0] != len(TISSUES):
        raise ValueError(f"expected ({len(TISSUES)}, X, Y, Z) tissue fractions, got shape {fractions.shape}")
    shape = fractions.shape[1:]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5CA7]))
    contrast = np.asarray(look.contrast, dtype=np.float32)
    texture = _random_field(rng, shape, 1.6)
    flat = fractions.reshape(len(TISSUES), -1)
    image = (contrast @ flat).reshape(shape)
    image += texture * (contrast * np.asarray(TEXTURE, dtype=np.float32) @ flat).reshape(shape)
    image *= _bias_field(rng, shape, look.bias_strength)
    # A real 1 mm scan is band-limited by its own point-spread function: without it every edge would be a
    # one-voxel step that no acquisition produces (and whose sub-voxel position no SR model could recover).
    image = ndimage.gaussian_filter(image, HR_PSF_SIGMA_VOXELS, mode="nearest")
    noise = rng.standard_normal((2,) + shape, dtype=np.float32) * np.float32(look.hr_noise)
    image = np.hypot(image + noise[0], noise[1])
    # Integer scanner units, as a scanner stores them (also lets the NIfTI compress).
    return np.round(image * np.float32(look.gain)).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- sites


def write_phantom_sites(
    out_dir: str | Path,
    n_sites: int = 3,
    subjects_per_site: int = SUBJECTS_PER_SITE,
    shape: Sequence[int] = (96, 96, 48),
    seed: int = 0,
) -> list[Path]:
    """Write phantom hospital sites in the real site format.

    Layout: ``out_dir/site-<i>-<scanner>/sub-<NNN>.nii.gz`` (float32, 1 mm isotropic, RAS affine centred on the
    volume; each subject its own patient) and ``site.toml`` (see :func:`_site_toml`). Existing files of the same
    names are overwritten. Deterministic given ``seed``.

    Returns:
        The site folders, in site order.
    """
    if n_sites < 1 or subjects_per_site < 1:
        raise ValueError(f"need at least one site and one subject, got {n_sites} sites x {subjects_per_site} subjects")
    shape = _check_shape(shape)
    out_dir = Path(out_dir)
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    looks = [site_look(i, seed) for i in range(n_sites)]
    sites = [out_dir / f"site-{i + 1}-{look.slug}" for i, look in enumerate(looks)]
    for i, (site_dir, look) in enumerate(zip(sites, looks, strict=True)):
        site_dir.mkdir(parents=True, exist_ok=True)
        text = _site_toml(site_dir.name, look, split_seed=int(seed) + i).encode()
        atomic_write(site_dir / "site.toml", lambda handle, text=text: handle.write(text))

    def write_subject(task: tuple[int, int]) -> None:
        i, j = task
        anatomy_seed, render_seed = np.random.SeedSequence([int(seed), i, j]).generate_state(2)
        image = render(make_phantom(shape, int(anatomy_seed)), looks[i], int(render_seed))
        nifti = nib.Nifti1Image(image, affine)
        nifti.header.set_xyzt_units("mm")
        nifti.set_qform(affine, code=1)
        nifti.set_sform(affine, code=1)
        nib.save(nifti, sites[i] / f"sub-{j + 1:03d}.nii.gz")

    tasks = [(i, j) for i in range(n_sites) for j in range(subjects_per_site)]
    # numpy, pocketfft and zlib release the GIL: threads use every core; results do not depend on the order.
    with ThreadPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1)) as pool:
        list(pool.map(write_subject, tasks))
    for site_dir, look in zip(sites, looks, strict=True):
        log.info("wrote phantom site %s: %d subjects, %s, %s", site_dir, subjects_per_site, look.scanner, look.preset)
    return sites


def _site_toml(name: str, look: ScannerLook, split_seed: int) -> str:
    """The ``site.toml`` text of a phantom site: name, modality, scanner, consent to share its local model and
    test previews (simulated data: no patient to protect), ``[acquisition]``, ``[split]`` seed and fractions, and a
    ``[policy]`` that accepts any batch size and step count (no patient to protect either; quick runs and tests use
    batches and rounds smaller than a real site's safe defaults).

    Numeric acquisition overrides are written as floats (mm, noise fractions), string ones as they are.
    """
    acquisition: dict[str, str | float] = {"profile": look.preset}
    for key, value in sorted(look.overrides.items()):
        acquisition[key] = value if isinstance(value, str) else float(value)
    return tomli_w.dumps(
        {
            "name": name,
            "modality": "MR",
            "scanner": look.scanner,
            "share_local_model": True,
            "share_previews": True,
            "acquisition": acquisition,
            "split": {"seed": int(split_seed), "fractions": list(SPLIT_FRACTIONS)},
            "policy": {"min_batch_size": 1, "min_local_steps": 1},
        }
    )


# --------------------------------------------------------------------------------------------- helpers


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom shape must be three sizes >= 16 voxels, got {shape}")
    return shape


def _centred_grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open (broadcastable) voxel coordinates relative to the volume centre, float32."""
    return tuple(
        (np.arange(n, dtype=np.float32) - (n - 1) / 2.0).reshape([-1 if a == axis else 1 for a in range(3)])
        for axis, n in enumerate(shape)
    )


@functools.lru_cache(maxsize=32)
def _gaussian_transfer(shape: tuple[int, int, int], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Where a Gaussian of ``sigma`` voxels passes frequencies on the rfftn grid of ``shape`` (DC excluded): the
    boolean mask of non-negligible coefficients and their float32 transfer values."""
    kx, ky = (sfft.fftfreq(n).astype(np.float32) for n in shape[:2])
    kz = sfft.rfftfreq(shape[2]).astype(np.float32)
    k2 = kx[:, None, None] ** 2 + ky[None, :, None] ** 2 + kz[None, None, :] ** 2
    transfer = np.exp(np.float32(-2.0 * np.pi**2 * sigma**2) * k2)
    transfer[0, 0, 0] = 0.0
    passed = transfer > 1e-6
    return passed, transfer[passed]


def _random_field(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with Gaussian correlation of ``sigma`` voxels (periodic), float32.

    Spectral synthesis: white complex noise on the passed frequencies only (cheap for smooth fields), one irfftn.
    """
    passed, transfer = _gaussian_transfer(shape, sigma)
    noise = rng.standard_normal((2, transfer.size), dtype=np.float32) * transfer
    spectrum = np.zeros(passed.shape, dtype=np.complex64)
    spectrum[passed] = noise[0] + 1j * noise[1]
    out = sfft.irfftn(spectrum, s=shape)
    return out / max(float(out.std()), 1e-12)


def _distance_to_zero_set(values: np.ndarray) -> np.ndarray:
    """Approximate distance in voxels to the zero level set of a smooth field: |f| / |grad f| (capped at 20)."""
    grad = np.gradient(values)
    norm = np.sqrt(grad[0] ** 2 + grad[1] ** 2 + grad[2] ** 2)
    return np.minimum(np.abs(values) / np.maximum(norm, 1e-3), 20.0)


def _partial(signed_distance: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre is ``signed_distance`` voxels inside a locally flat boundary."""
    return np.clip(0.5 + signed_distance, 0.0, 1.0).astype(np.float32, copy=False)


def _mirrored_ellipsoids(coords: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Partial-volume fraction of an axis-aligned ellipsoid and its left-right mirror (x -> -x), voxel units."""
    parts = []
    for side in (-1.0, 1.0):
        shifted = (coords[0] - side * centre[0], coords[1] - centre[1], coords[2] - centre[2])
        r = np.sqrt(sum((c / float(radius)) ** 2 for c, radius in zip(shifted, radii, strict=True)))
        parts.append(_partial((1.0 - r) * float(min(radii))))
    return np.maximum(*parts)


def _lesions(rng: np.random.Generator, shape: tuple[int, int, int], allowed: np.ndarray) -> np.ndarray:
    """2-6 small round lesions (radius 1-3.5 voxels) centred in ``allowed`` voxels; partial-volume fractions."""
    out = np.zeros(shape, dtype=np.float32)
    candidates = np.flatnonzero(allowed)
    if candidates.size == 0:
        return out
    centres = np.unravel_index(rng.choice(candidates, size=int(rng.integers(2, 7))), shape)
    for centre in zip(*centres, strict=True):
        radius = rng.uniform(1.0, 3.5)
        box = tuple(slice(max(c - 5, 0), min(c + 6, n)) for c, n in zip(centre, shape, strict=True))
        r = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.ogrid[box], centre, strict=True)))
        np.maximum(out[box], _partial(radius - r), out=out[box])
    return out


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative bias: exp of a random quadratic polynomial in coordinates normalised to [-1, 1].

    The log-bias has a standard deviation of about ``0.7 * strength`` over the volume.
    """
    u, v, w = (c / (n / 2.0) for c, n in zip(_centred_grid(shape), shape, strict=True))
    terms = (u, v, w, u * u - 1 / 3, v * v - 1 / 3, w * w - 1 / 3, u * v, v * w, u * w)
    coefficients = rng.standard_normal(len(terms)) * strength / np.sqrt(len(terms) / 3.0)
    log_bias = sum(np.float32(c) * t for c, t in zip(coefficients, terms, strict=True))
    return np.exp(log_bias).astype(np.float32)
