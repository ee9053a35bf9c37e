"""Scoring a model on a site's validation pairs, beside the interpolation baseline of the same LR input.

One path for every family: the site's :class:`client.pairs.Pairing` says which slices are scored and how the
baseline is made; the metrics, their averaging and their names are the same everywhere. Metric keys are
kebab-case, as Flower's ``num-examples``: ``psnr`` (dB), ``ssim``, ``nrmse``, ``hfen``, the same four of the baseline
as ``baseline-psnr`` ..., and ``num-val-scans``, ``num-val-slices``, ``eval-seconds``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from client.training import FOREGROUND_LEVEL
from shared_models.metrics import score

if TYPE_CHECKING:
    from client.pairs import Pairing, ScanPair

IMAGE_METRICS = ("psnr", "ssim", "nrmse", "hfen")
BASELINE_PREFIX = "baseline-"
METRIC_KEYS = (*IMAGE_METRICS, *(BASELINE_PREFIX + k for k in IMAGE_METRICS))


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


@functools.cache  # one small dict per validation pair, for as many sites as the process serves
def _baseline_scores(pairing: Pairing, pair: ScanPair, max_slices: int) -> dict[str, float]:
    """The baseline's metrics of a pair: they never change during a run, so they are computed once per process."""
    interpolated, hr = pairing.baseline(pair, max_slices=max_slices)
    return {BASELINE_PREFIX + k: v for k, v in score(interpolated, hr).items()}


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
