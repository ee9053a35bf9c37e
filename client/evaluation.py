"""Scoring a model on a site's validation pairs, beside the interpolation baseline of the same LR input, and
scoring one whole test scan.

One path for every family: the site's :class:`client.pairs.Pairing` says which slices are scored, how the
baseline is made and how an output is acquired again; the metrics, their averaging and their names are the same
everywhere. Metric keys are kebab-case, as Flower's ``num-examples``: ``psnr`` (dB), ``ssim``, ``nrmse``, ``hfen``, the
same four of the baseline as ``baseline-psnr`` ..., and ``num-val-scans``, ``num-val-slices``, ``eval-seconds``
(:func:`evaluate_pairs`, every round); a test scan adds ``dc-error`` and ``hf-excess`` (:func:`score_scan`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.ndimage import center_of_mass
from torch import nn

from client.training import FOREGROUND_LEVEL
from shared_models.metrics import data_consistency_error, high_frequency_excess, score

if TYPE_CHECKING:
    from client.degrade import AcquisitionProfile
    from client.pairs import Pairing, ScanPair

IMAGE_METRICS = ("psnr", "ssim", "nrmse", "hfen")
BASELINE_PREFIX = "baseline-"
METRIC_KEYS = (*IMAGE_METRICS, *(BASELINE_PREFIX + k for k in IMAGE_METRICS))
#: The keys of :func:`score_scan`.
SCAN_METRICS = (*IMAGE_METRICS, "dc-error", "hf-excess")


def evaluation_slices(hr: np.ndarray, max_slices: int) -> np.ndarray:
    """Indices of the in-plane slices to score: those with anatomy, evenly thinned to at most ``max_slices``."""
    foreground = np.flatnonzero(hr.reshape(-1, hr.shape[2]).max(axis=0) >= FOREGROUND_LEVEL)
    if len(foreground) == 0:
        foreground = np.arange(hr.shape[2])
    if len(foreground) > max_slices:
        foreground = foreground[np.linspace(0, len(foreground) - 1, max_slices).round().astype(int)]
    return foreground


def as_batch(volume: np.ndarray) -> torch.Tensor:
    """(X, Y, Z) slices -> (Z, 1, X, Y) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, 2, 0)[:, None], dtype=np.float32))


#: The baseline's scores of each validation pair that is alive, per (pairing, max_slices). Weak keys: a pair the
#: prepared-site cache evicts (client.pairs) takes its scores with it, so memory follows the sites in use.
_BASELINE_SCORES: weakref.WeakKeyDictionary[ScanPair, dict[tuple[Pairing, int], dict[str, float]]] = (
    weakref.WeakKeyDictionary()
)


def _baseline_scores(pairing: Pairing, pair: ScanPair, max_slices: int) -> dict[str, float]:
    """The baseline's metrics of a pair: they never change during a run, so they are computed once per pair."""
    cached = _BASELINE_SCORES.setdefault(pair, {})
    if (pairing, max_slices) not in cached:
        interpolated, hr = pairing.baseline(pair, max_slices=max_slices)
        cached[pairing, max_slices] = {BASELINE_PREFIX + k: v for k, v in score(interpolated, hr).items()}
    return cached[pairing, max_slices]


def evaluate_pairs(
    model: nn.Module, pairs: Sequence[ScanPair], pairing: Pairing, *, device: torch.device, max_slices: int
) -> dict[str, float]:
    """Mean PSNR (dB), SSIM, NRMSE, HFEN of the model and of the baseline over the scans.

    2D metrics per scored slice, averaged per scan, then over scans with equal weight.
    """
    if not pairs:
        raise ValueError("evaluation needs at least one validation pair")
    start = time.perf_counter()
    per_scan, total_slices = [], 0
    for pair in pairs:
        sr, hr = pairing.restored(model, pair, device=device, max_slices=max_slices)
        scores = score(sr, hr)
        scores.update(_baseline_scores(pairing, pair, max_slices))
        per_scan.append([scores[k] for k in METRIC_KEYS])
        total_slices += hr.shape[0]
    means = np.mean(np.asarray(per_scan, dtype=np.float64), axis=0)
    result = {k: float(v) for k, v in zip(METRIC_KEYS, means)}
    result.update({"num-val-scans": len(pairs), "num-val-slices": total_slices,
                   "eval-seconds": time.perf_counter() - start})
    return result


def score_scan(
    volume: np.ndarray, pair: ScanPair, pairing: Pairing, profile: AcquisitionProfile, *, max_slices: int
) -> dict[str, float]:
    """Scores of one output for a whole scan (:data:`SCAN_METRICS`), a model's (``pairing.restore``) or the
    interpolation's (``pairing.interpolate``), so that the two are comparable.

    ``volume``: float32 on the HR grid (``pair.hr.shape``), clamped to [0, 1] first as a deployed output would be.
    ``psnr`` (dB), ``ssim``, ``nrmse``, ``hfen``: on the scored slices, exactly as :func:`evaluate_pairs` scores them.
    ``dc-error``: RMS over the whole LR grid of ``pairing.reacquire(volume)`` (``profile`` without noise, at
    ``pair.spacing``) minus ``pair.lr``, normalised units: about the site's noise level for a faithful output.
    ``hf-excess``: :func:`shared_models.metrics.high_frequency_excess` on ``pairing.excess_planes``, the planes
    pooled (their energies summed before the ratio, so nearly empty planes at the edge of the anatomy cannot
    dominate): 0 when the output invents no frequency beyond the LR band.
    """
    volume = np.clip(np.asarray(volume, dtype=np.float32), 0.0, 1.0)
    if volume.shape != pair.hr.shape:
        raise ValueError(f"scan {pair.subject}: output {volume.shape} is not on the HR grid {pair.hr.shape}")
    scores = score(pairing.scored(pair, volume, max_slices=max_slices),
                   pairing.scored(pair, pair.hr, max_slices=max_slices))
    scores["dc-error"] = data_consistency_error(pairing.reacquire(pair, volume, profile, pair.spacing), pair.lr)
    planes, reduced_axes = pairing.excess_planes(pair, volume, max_slices=max_slices)
    truth, _ = pairing.excess_planes(pair, pair.hr, max_slices=max_slices)
    pooled = high_frequency_excess(planes.transpose(0, 1), truth.transpose(0, 1), pair.scale, reduced_axes=reduced_axes)
    scores["hf-excess"] = float(pooled[0])
    return scores


def crop_preview(
    pair: ScanPair, volumes: Mapping[str, np.ndarray], interpolation: np.ndarray, size: int = 64
) -> dict[str, np.ndarray]:
    """Float32 2D crops in [0, 1] of one scan for a picture: ``lr``, ``interpolation``, ``hr`` and ``sr:<name>`` for
    each of ``volumes`` (outputs on the HR grid by model name; ``interpolation`` likewise).

    The plane: the (X, Y) slice when the LR grid is coarser in-plane (in-plane, isotropic and self-supervised
    pairs), else the (X, Z) plane (through-plane pairs: a plane that shows the restored axis). Its position: the
    middle one of those with anatomy along the remaining axis (for (X, Y) slices, the middle scored slice when
    every slice with anatomy is scored). The HR crops are ``size`` x ``size`` (less where the plane is smaller)
    around the anatomy's centre of mass, on the LR grid's block boundaries, and the ``lr`` crop is the same field
    of view on the LR grid: ``size / scale`` along each reduced axis, e.g. (32, 32) beside (64, 64) at scale 2
    in-plane, (64, 32) through-plane. ``size`` must be a multiple of the scale.
    """
    ratio = [h // n for h, n in zip(pair.hr.shape, pair.lr.shape)]
    if size < 1 or size % pair.scale:
        raise ValueError(f"preview size {size} must be a positive multiple of the scale {pair.scale}")
    for name, volume in {**volumes, "interpolation": interpolation}.items():
        if np.shape(volume) != pair.hr.shape:
            raise ValueError(f"scan {pair.subject}: {name} {np.shape(volume)} is not on the HR grid {pair.hr.shape}")
    plane = (0, 1) if ratio[0] > 1 or ratio[1] > 1 else (0, 2)
    fixed = 3 - sum(plane)
    with_anatomy = evaluation_slices(np.moveaxis(pair.hr, fixed, 2), pair.hr.shape[fixed])
    position = int(with_anatomy[len(with_anatomy) // 2])
    hr_plane = np.take(pair.hr, position, axis=fixed)
    centre = center_of_mass(hr_plane) if hr_plane.any() else np.asarray(hr_plane.shape) / 2.0
    window = []
    for c, n, r in zip(centre, hr_plane.shape, (ratio[a] for a in plane)):
        side = min(size, n) // r * r
        start = int(np.clip(round((c - side / 2) / r), 0, (n - side) // r)) * r
        window.append((start, side, r))

    def crop(image: np.ndarray, on_lr_grid: bool = False) -> np.ndarray:
        index = tuple(slice(s // r, (s + side) // r) if on_lr_grid else slice(s, s + side) for s, side, r in window)
        return np.clip(image[index], 0.0, 1.0).astype(np.float32)

    crops = {
        "lr": crop(np.take(pair.lr, position // ratio[fixed], axis=fixed), on_lr_grid=True),
        "interpolation": crop(np.take(interpolation, position, axis=fixed)),
        "hr": crop(hr_plane),
    }
    crops.update({f"sr:{name}": crop(np.take(volume, position, axis=fixed)) for name, volume in volumes.items()})
    return crops
