"""shared_models.metrics and shared_models.losses against independent references (skimage, scipy) on real scans."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from shared_models import metrics
from shared_models.losses import LOSS_TERMS, build_loss
from tests.conftest import DATA


def _load(relative: str, lo: float, hi: float) -> np.ndarray:
    """Volume normalised to [0, 1] by the window [lo, hi], float64."""
    volume = np.asarray(nib.load(DATA / relative).dataobj, dtype=np.float64)
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0)


@pytest.fixture(scope="module")
def hr_sr() -> tuple[np.ndarray, np.ndarray]:
    """Three real 64x56 HR slices (T1 MR twice, CT in a brain window) and a plausible imperfect SR of each:
    the 2x bicubic reconstruction of a 2x2-mean LR plus a little noise and an intensity offset. (3, 64, 56)."""
    mr = _load("mri/colin27_t1_1mm.nii.gz", 0.0, 255.0)
    ct = _load("ct/ct_brain_atlas_1mm.nii.gz", -160.0, 240.0)
    hr = np.stack([mr[60:124, 80:136, 90], mr[60:124, 80:136, 60], ct[70:134, 70:126, 90]])
    lr = F.avg_pool2d(torch.from_numpy(hr)[:, None], 2)
    sr = metrics.upsample_baseline(lr, 2)[:, 0].numpy()
    sr = sr + 0.01 * np.random.default_rng(0).standard_normal(sr.shape) + 0.005
    sr[:, :3, :3], sr[:, -3:, -3:] = -0.2, 1.3  # out-of-range output that scoring must clamp
    return hr, sr


def _batch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)[:, None]


def _skimage_ssim(sr: np.ndarray, hr: np.ndarray) -> float:
    return structural_similarity(
        hr, sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )


def _scipy_hfen(sr: np.ndarray, hr: np.ndarray) -> float:
    # Same operator as ours: scipy's truncate=4.0 (13 taps for sigma 1.5) and mode="mirror" (= torch "reflect").
    log = lambda x: ndimage.gaussian_laplace(x, sigma=1.5, mode="mirror", truncate=4.0)  # noqa: E731
    return float(np.linalg.norm(log(sr) - log(hr)) / np.linalg.norm(log(hr)))


REFERENCES = {
    # name: (reference on one image, absolute tolerance, why)
    "psnr": (lambda sr, hr: peak_signal_noise_ratio(hr, sr, data_range=1.0), 1e-4),  # dB; both in float64
    "ssim": (_skimage_ssim, 1e-4),  # MONAI computes SSIM in float32 (observed error ~2e-6)
    "nrmse": (lambda sr, hr: normalized_root_mse(hr, sr, normalization="euclidean"), 1e-10),  # float64 both
    "hfen": (_scipy_hfen, 1e-10),  # same kernels, same boundary, float64 both: only summation order differs
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_metric_matches_reference_per_image_2d(hr_sr, name: str) -> None:
    hr, sr = hr_sr
    reference, tolerance = REFERENCES[name]
    expected = [reference(np.clip(sr[i], 0, 1), hr[i]) for i in range(len(hr))]
    ours = getattr(metrics, name)(_batch(sr), _batch(hr))
    assert ours.shape == (len(hr),)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_metric_matches_reference_3d(name: str) -> None:
    hr = _load("mri/colin27_t1_1mm.nii.gz", 0.0, 255.0)[70:94, 90:114, 80:100]
    sr = np.clip(ndimage.gaussian_filter(hr, 0.8), 0, 1)
    reference, tolerance = REFERENCES[name]
    ours = getattr(metrics, name)(torch.from_numpy(sr)[None, None], torch.from_numpy(hr)[None, None])
    assert float(ours[0]) == pytest.approx(reference(sr, hr), abs=tolerance)


def test_score_is_the_batch_mean_of_per_image_values_with_sr_clamped(hr_sr) -> None:
    hr, sr = hr_sr
    result = metrics.score(_batch(sr), _batch(hr))
    assert set(result) == {"psnr", "ssim", "nrmse", "hfen"}
    for name, (reference, tolerance) in REFERENCES.items():
        expected = np.mean([reference(np.clip(sr[i], 0, 1), hr[i]) for i in range(len(hr))])
        assert result[name] == pytest.approx(expected, abs=tolerance)
    unclamped = np.mean([peak_signal_noise_ratio(hr[i], sr[i], data_range=1.0) for i in range(len(hr))])
    assert result["psnr"] > unclamped + 0.1  # the clamp changed the numbers


@pytest.mark.parametrize("shape", [(2, 1, 7, 9), (1, 1, 4, 5, 6)])
def test_upsample_baseline_shape_range_and_constants(shape: tuple[int, ...]) -> None:
    lr = torch.rand(shape)
    lr[0, 0, 0] = 1.0  # hard edges make bicubic overshoot
    up = metrics.upsample_baseline(lr, 4)
    assert up.shape == (*shape[:2], *(4 * n for n in shape[2:]))
    assert up.min() >= 0 and up.max() <= 1
    flat = metrics.upsample_baseline(torch.full(shape, 0.3), 2)
    torch.testing.assert_close(flat, torch.full_like(flat, 0.3))


def test_metrics_reject_mismatched_or_too_small_inputs() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 17))
    with pytest.raises(ValueError, match=">= 11"):
        metrics.ssim(torch.rand(1, 1, 10, 16), torch.rand(1, 1, 10, 16))


def test_laplacian_of_gaussian_matches_scipy_and_is_differentiable() -> None:
    # Even on a constant the response is scipy's (~ -1.9e-4 x value: the sampled, truncated d2 kernel does not sum
    # to exactly 0), which is what matching the reference means.
    for images in (np.full((1, 16, 16), 0.7), np.random.default_rng(1).random((2, 12, 13, 14))):
        x = torch.from_numpy(images)[:, None].requires_grad_(True)
        out = metrics.laplacian_of_gaussian(x)
        expected = [ndimage.gaussian_laplace(image, sigma=1.5, mode="mirror") for image in images]
        np.testing.assert_allclose(out.detach()[:, 0].numpy(), np.stack(expected), rtol=0, atol=1e-12)
        out.sum().backward()
        assert x.grad is not None


def test_loss_terms_and_weighting(hr_sr) -> None:
    hr = _batch(hr_sr[0]).float()
    sr = _batch(np.clip(hr_sr[1], 0, 1)).float().requires_grad_(True)
    loss = build_loss({name: 1.0 for name in LOSS_TERMS})
    parts = {name: value.item() for name, value in loss.components(sr, hr).items()}
    assert set(parts) == set(LOSS_TERMS)
    assert parts["l1"] == pytest.approx(F.l1_loss(sr, hr).item())
    assert parts["charbonnier"] == pytest.approx(parts["l1"], abs=1e-3)  # eps = 1e-3
    assert parts["ssim"] == pytest.approx(1 - metrics.ssim(sr, hr).mean().item(), abs=1e-5)
    weighted = build_loss({"l1": 2.0, "ssim": 0.5, "mse": 0})
    assert set(weighted.terms) == {"l1", "ssim"}
    assert weighted(sr, hr).item() == pytest.approx(2.0 * parts["l1"] + 0.5 * parts["ssim"], rel=1e-6)
    loss(sr, hr).backward()
    assert sr.grad is not None and torch.isfinite(sr.grad).all()


def test_every_loss_term_works_in_3d() -> None:
    sr = torch.rand(1, 1, 12, 12, 12, requires_grad=True)
    value = build_loss({name: 1.0 for name in LOSS_TERMS})(sr, torch.rand(1, 1, 12, 12, 12))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(sr.grad).all()


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"perceptual": 1.0}, "known: l1"),
        ({"l1": -1.0}, ">= 0"),
        ({"l1": float("nan")}, ">= 0"),
        ({"l1": 0.0}, "positive"),
    ],
)
def test_build_loss_rejects_bad_specs(weights: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_loss(weights)


def _numpy_high_frequency_excess(
    sr: np.ndarray, hr: np.ndarray, scale: int, reduced_axes: tuple[int, ...]
) -> np.ndarray:
    """The formula, independently: per image (B, C, H, W) -> (B,), numpy FFT and frequency grid."""
    f_h, f_w = np.meshgrid(np.fft.fftfreq(hr.shape[-2]), np.fft.fftfreq(hr.shape[-1]), indexing="ij")
    radius = np.sqrt((f_h**2 if -2 in reduced_axes else 0.0) + (f_w**2 if -1 in reduced_axes else 0.0))
    band = radius > 0.5 / scale
    power_sr = np.abs(np.fft.fft2(np.clip(sr, 0.0, 1.0))) ** 2
    power_hr = np.abs(np.fft.fft2(hr)) ** 2
    excess = np.where(band, np.maximum(power_sr - power_hr, 0.0), 0.0).sum(axis=(1, 2, 3))
    return excess / np.where(band, power_hr, 0.0).sum(axis=(1, 2, 3))


@pytest.mark.parametrize("scale, reduced_axes", [(2, (-2, -1)), (4, (-2, -1)), (2, (-1,)), (4, (-2,))])
def test_high_frequency_excess_matches_the_formula(scale: int, reduced_axes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(scale)
    hr = ndimage.gaussian_filter(rng.random((3, 2, 17, 24)), (0, 0, 1.0, 1.0))  # smooth: little high frequency
    sr = hr + 0.05 * rng.standard_normal(hr.shape)  # some of it out of [0, 1]: clamped first
    ours = metrics.high_frequency_excess(torch.from_numpy(sr), torch.from_numpy(hr), scale, reduced_axes=reduced_axes)
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours.numpy(), _numpy_high_frequency_excess(sr, hr, scale, reduced_axes), rtol=1e-10)
    assert (ours > 0.2).all()
    same = metrics.high_frequency_excess(torch.from_numpy(hr), torch.from_numpy(hr), scale)
    assert torch.equal(same, torch.zeros(3, dtype=same.dtype))


def test_high_frequency_excess_rejects_bad_arguments() -> None:
    image = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        metrics.high_frequency_excess(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), 2)
    with pytest.raises(ValueError, match="reduced_axes"):
        metrics.high_frequency_excess(image, image, 2, reduced_axes=(0,))
    with pytest.raises(ValueError, match="scale"):
        metrics.high_frequency_excess(image, image, 0)


def test_data_consistency_error_is_the_rms_difference() -> None:
    rng = np.random.default_rng(3)
    reacquired, lr = rng.random((8, 9, 5)), rng.random((8, 9, 5))
    expected = np.sqrt(np.mean((reacquired - lr) ** 2))
    assert metrics.data_consistency_error(reacquired, lr) == pytest.approx(expected, rel=1e-12)
    assert metrics.data_consistency_error(torch.from_numpy(lr), lr) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.data_consistency_error(reacquired, lr[:-1])
