"""Scoring a model on a site's validation scans, beside the bicubic baseline of the same LR input."""

from __future__ import annotations

import functools
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from client.pairs import ScanPair
from client.training import FOREGROUND_LEVEL
from shared_models.inference import super_resolve
from shared_models.metrics import score, upsample_baseline

METRIC_KEYS = (
    "psnr", "ssim", "nrmse", "hfen", "bicubic_psnr", "bicubic_ssim", "bicubic_nrmse", "bicubic_hfen",
)


def evaluation_slices(hr: np.ndarray, max_slices: int) -> np.ndarray:
    """Indices of the in-plane slices to score: those with anatomy, evenly thinned to at most ``max_slices``."""
    foreground = np.flatnonzero(hr.reshape(-1, hr.shape[2]).max(axis=0) >= FOREGROUND_LEVEL)
    if len(foreground) == 0:
        foreground = np.arange(hr.shape[2])
    if len(foreground) > max_slices:
        foreground = foreground[np.linspace(0, len(foreground) - 1, max_slices).round().astype(int)]
    return foreground


@functools.lru_cache(maxsize=64)
def _baseline_scores(pair: ScanPair, scale: int, max_slices: int) -> dict[str, float]:
    """Bicubic metrics of a scan: they never change during a run, so they are computed once per process."""
    index = evaluation_slices(pair.hr, max_slices)
    if _is_3d(pair):  # trilinear on the whole volume, then the scored slices
        volume = upsample_baseline(torch.from_numpy(pair.lr)[None, None], scale)[0, 0].numpy()
        bicubic = _as_batch(volume[:, :, index])
    else:
        bicubic = upsample_baseline(_as_batch(pair.lr[:, :, index]), scale)
    return {f"bicubic_{k}": v for k, v in score(bicubic, _as_batch(pair.hr[:, :, index])).items()}


def _is_3d(pair: ScanPair) -> bool:
    """Whether the pair's LR is scaled through-plane too (a 3D model's data)."""
    return pair.lr.shape[2] != pair.hr.shape[2]


def _as_batch(volume: np.ndarray) -> torch.Tensor:
    """(X, Y, Z) slices -> (Z, 1, X, Y) tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, 2, 0)[:, None]))


def evaluate_pairs(
    model: nn.Module, pairs: Sequence[ScanPair], *, scale: int, device: torch.device, max_slices: int
) -> dict[str, float]:
    """Mean PSNR (dB), SSIM, NRMSE, HFEN of the model and of bicubic upsampling over the scans.

    Each scan is scored on its in-plane slices (2D metrics per slice, averaged per scan), then scans are
    averaged with equal weight. Adds ``num_val_scans``, ``num_val_slices`` and ``eval_seconds``.
    """
    start = time.perf_counter()
    per_scan = []
    total_slices = 0
    for pair in pairs:
        index = evaluation_slices(pair.hr, max_slices)
        sr = super_resolve(model, pair.lr, device=device, slices=index)  # 3D: only the tiles these slices need
        scores = score(_as_batch(sr), _as_batch(pair.hr[:, :, index]))
        scores.update(_baseline_scores(pair, scale, max_slices))
        per_scan.append([scores[k] for k in METRIC_KEYS])
        total_slices += len(index)
    means = np.mean(np.asarray(per_scan, dtype=np.float64), axis=0)
    result = {k: float(v) for k, v in zip(METRIC_KEYS, means)}
    result.update(
        num_val_scans=len(pairs), num_val_slices=total_slices, eval_seconds=time.perf_counter() - start
    )
    return result
