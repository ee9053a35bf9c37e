"""Image-quality metrics for SR (torch): PSNR, SSIM, NRMSE, HFEN, each beside the interpolation baseline, and two
of what a model invents: high-frequency excess and data consistency.

Conventions: tensors (B, C, H, W) or (B, C, D, H, W), intensities normalised to [0, 1] (data range 1.0).
Each metric is computed per image (over all its channels and voxels) and returned as a (B,) tensor; ``score``
averages those over the batch. SR is clamped to [0, 1] first, as a deployed model's output would be.
Undefined cases follow the formulas: an image identical to HR has PSNR inf, and an all-constant HR image makes
NRMSE (zero HR) / HFEN (flat HR) divide by zero, so callers should skip empty background slices.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.layers import separable_filtering

from shared_models.resample import upsample_baseline

__all__ = [
    "psnr", "ssim", "nrmse", "hfen", "laplacian_of_gaussian", "upsample_baseline", "score",
    "high_frequency_excess", "data_consistency_error",
]

DATA_RANGE = 1.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
LOG_SIGMA = 1.5
LOG_TRUNCATE = 4.0  # kernel radius = int(truncate * sigma + 0.5) = 6 -> 13 taps, as scipy.ndimage


def _prepare(sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes, clamp SR to [0, 1]; both as float64 for exact reductions."""
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if sr.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W), got shape {tuple(sr.shape)}")
    return sr.detach().double().clamp(0.0, 1.0), hr.detach().double()


def _norm_per_image(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def psnr(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, peak = 1.0 (MONAI ``PSNRMetric``). Returns (B,)."""
    sr, hr = _prepare(sr, hr)
    return PSNRMetric(max_val=DATA_RANGE)(sr, hr).flatten()


def ssim(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (MONAI ``SSIMMetric``: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
    data range 1; mean over the valid (unpadded) window positions, as skimage with ``gaussian_weights=True``,
    ``use_sample_covariance=False``). Every spatial axis must be >= 11. Returns (B,)."""
    sr, hr = _prepare(sr, hr)
    if min(sr.shape[2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs every spatial axis >= {SSIM_WINDOW}, got shape {tuple(sr.shape)}")
    metric = SSIMMetric(
        spatial_dims=sr.ndim - 2,
        data_range=DATA_RANGE,
        kernel_type="gaussian",
        win_size=SSIM_WINDOW,
        kernel_sigma=SSIM_SIGMA,
        k1=SSIM_K1,
        k2=SSIM_K2,
    )
    return metric(sr, hr).flatten()


def nrmse(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """||SR - HR||_2 / ||HR||_2 per image (skimage ``normalized_root_mse(normalization='euclidean')``). Returns (B,)."""
    sr, hr = _prepare(sr, hr)
    return _norm_per_image(sr - hr) / _norm_per_image(hr)


def _gaussian_kernels(sigma: float, truncate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled, sum-normalised 1D Gaussian and its exact second derivative (scipy's ``_gaussian_kernel1d``)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g0 = torch.exp(-0.5 * (x / sigma) ** 2)
    g0 = g0 / g0.sum()
    g2 = (x**2 / sigma**4 - 1.0 / sigma**2) * g0
    return g0, g2


def laplacian_of_gaussian(x: torch.Tensor, sigma: float = LOG_SIGMA, truncate: float = LOG_TRUNCATE) -> torch.Tensor:
    """Laplacian of Gaussian over every spatial axis of (B, C, *spatial); differentiable; same shape out.

    Written here because MONAI has no LoG filter (``LaplaceFilter`` is an unsmoothed 3x3 Laplacian, and a Gaussian
    followed by it is a different discrete operator). As scipy.ndimage.gaussian_laplace: sum over axes of the
    separable (d2/dx2 Gaussian along that axis) x (Gaussian along the others), kernels truncated at
    ``truncate * sigma``. Borders are mirrored without repeating the edge voxel (torch "reflect" = scipy
    ``mode="mirror"``), so each spatial axis must exceed the kernel radius. Like scipy's, the sampled truncated
    kernel does not sum to exactly 0: a constant c gives about -1.9e-4 * c (sigma 1.5).
    """
    g0, g2 = _gaussian_kernels(sigma, truncate)
    dims = x.ndim - 2
    if min(x.shape[2:]) <= g0.numel() // 2:
        raise ValueError(f"LoG (radius {g0.numel() // 2}) needs spatial axes > radius, got shape {tuple(x.shape)}")
    g0, g2 = g0.to(x), g2.to(x)
    return sum(
        separable_filtering(x, [g2 if axis == d else g0 for axis in range(dims)], mode="reflect") for d in range(dims)
    )


def hfen(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """High-frequency error norm ||LoG(SR) - LoG(HR)|| / ||LoG(HR)|| per image, LoG sigma 1.5. Returns (B,)."""
    sr, hr = _prepare(sr, hr)
    log_hr = laplacian_of_gaussian(hr)
    return _norm_per_image(laplacian_of_gaussian(sr) - log_hr) / _norm_per_image(log_hr)


_METRICS = {"psnr": psnr, "ssim": ssim, "nrmse": nrmse, "hfen": hfen}


@torch.no_grad()
def score(sr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
    """Batch means of the per-image metrics: {"psnr" (dB), "ssim", "nrmse", "hfen"}."""
    return {name: float(fn(sr, hr).mean()) for name, fn in _METRICS.items()}


def high_frequency_excess(
    sr: torch.Tensor, hr: torch.Tensor, scale: int, *, reduced_axes: tuple[int, ...] = (-2, -1)
) -> torch.Tensor:
    """Spectral energy that SR has beyond the LR band and HR lacks, relative to HR's energy there. Returns (B,).

    Ours: no maintained library (MONAI, torchmetrics, skimage, piq) has a measure of invented high frequencies.
    On (B, C, H, W) slices, per image (over all its channels), with the 2D DFT ``F`` of each slice and ``f`` the
    frequency in cycles/pixel, the band is the frequencies beyond what the LR grid can hold: radial frequency
    over ``reduced_axes`` (the slice axes along which LR is ``scale`` times coarser: both by default, ``(-1,)``
    for one-axis SR) ``> 0.5 / scale``, and the value is
    ``sum_band relu(|F_sr|^2 - |F_hr|^2) / sum_band |F_hr|^2``.

    Meaning: 0 = SR puts no more energy than HR at any frequency it had to invent (SR == HR, or a smooth output
    such as interpolation, which has less); it grows when a model adds texture or noise that the truth does not
    have, e.g. ~ (noise energy) / (HR's high-frequency energy) for white noise. It compares each frequency bin,
    so texture of the right power at the wrong bins counts as excess. SR is clamped to [0, 1] first, as for the
    other metrics; an HR with no energy in the band divides by zero.
    """
    sr, hr = _prepare(sr, hr)
    if sr.ndim != 4:
        raise ValueError(f"high_frequency_excess works on (B, C, H, W) slices, got shape {tuple(sr.shape)}")
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if not reduced_axes or not set(reduced_axes) <= {-2, -1} or len(set(reduced_axes)) != len(reduced_axes):
        raise ValueError(f"reduced_axes must be (-2, -1), (-2,) or (-1,), got {reduced_axes!r}")
    frequencies = {-2: torch.fft.fftfreq(sr.shape[-2], dtype=torch.float64)[:, None],
                   -1: torch.fft.fftfreq(sr.shape[-1], dtype=torch.float64)[None, :]}
    radial_squared = sum(frequencies[axis] ** 2 for axis in reduced_axes)
    band = (radial_squared > (0.5 / scale) ** 2).expand(sr.shape[-2:])
    power_sr = torch.fft.fft2(sr).abs().square()[..., band]  # (B, C, bins in the band)
    power_hr = torch.fft.fft2(hr).abs().square()[..., band]
    return (power_sr - power_hr).clamp_min(0.0).flatten(1).sum(1) / power_hr.flatten(1).sum(1)


def data_consistency_error(reacquired: np.ndarray | torch.Tensor, lr: np.ndarray | torch.Tensor) -> float:
    """Root-mean-square difference (normalised intensity units) between an SR output acquired again with the
    site's acquisition model and the LR input it was made from, over every LR voxel; same shapes, any rank.

    An output whose re-acquisition reproduces the LR image up to its noise scores about the noise level; one that
    invents or loses content the scanner would have seen scores more.
    """
    reacquired = torch.as_tensor(reacquired).double()
    lr = torch.as_tensor(lr).double()
    if reacquired.shape != lr.shape:
        raise ValueError(f"re-acquired and LR shapes differ: {tuple(reacquired.shape)} vs {tuple(lr.shape)}")
    return float((reacquired - lr).square().mean().sqrt())
