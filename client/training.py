"""Local training at one site: patch sampling from the site's train split and the supervised loop."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from client.pairs import ScanPair
from shared_models.losses import build_loss

#: A patch whose brightest HR voxel is below this (normalised units) is background and is re-drawn.
FOREGROUND_LEVEL = 0.05


class PatchSampler:
    """Draws aligned (LR, HR) 2D patches from in-plane slices of a site's scans.

    ``hr_size`` is the HR patch side in pixels; LR patches are ``hr_size // scale``. Each draw picks a scan
    (weighted by its number of slices), a slice and a position, re-draws background patches a few times,
    and applies one of the 8 flips/transpositions of the square (the same one to LR and HR).
    """

    def __init__(self, pairs: Sequence[ScanPair], scale: int, hr_size: int, rng: np.random.Generator):
        if not pairs:
            raise ValueError("PatchSampler needs at least one scan pair")
        self.pairs = list(pairs)
        self.scale = scale
        self.lr_size = hr_size // scale
        for pair in self.pairs:
            if min(pair.lr.shape[:2]) < self.lr_size:
                raise ValueError(
                    f"scan {pair.subject}: in-plane size {pair.hr.shape[:2]} is smaller than the patch size "
                    f"{hr_size}; lower --patch-size"
                )
        slices = np.array([p.hr.shape[2] for p in self.pairs], dtype=np.float64)
        self.weights = slices / slices.sum()
        self.rng = rng

    def _draw_one(self) -> tuple[np.ndarray, np.ndarray]:
        s, p = self.scale, self.lr_size
        for _attempt in range(10):
            pair = self.pairs[self.rng.choice(len(self.pairs), p=self.weights)]
            z = self.rng.integers(pair.lr.shape[2])
            x = self.rng.integers(pair.lr.shape[0] - p + 1)
            y = self.rng.integers(pair.lr.shape[1] - p + 1)
            hr = pair.hr[x * s : (x + p) * s, y * s : (y + p) * s, z]
            if hr.max() >= FOREGROUND_LEVEL:
                break
        lr = pair.lr[x : x + p, y : y + p, z]
        k = self.rng.integers(8)
        if k & 1:
            lr, hr = lr[::-1], hr[::-1]
        if k & 2:
            lr, hr = lr[:, ::-1], hr[:, ::-1]
        if k & 4:
            lr, hr = lr.T, hr.T
        return lr, hr

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: LR (B, 1, p, p) and HR (B, 1, s*p, s*p), float32 in [0, 1]."""
        lrs, hrs = zip(*(self._draw_one() for _ in range(size)))
        lr = torch.from_numpy(np.ascontiguousarray(np.stack(lrs)[:, None]))
        hr = torch.from_numpy(np.ascontiguousarray(np.stack(hrs)[:, None]))
        return lr, hr


@dataclass(frozen=True)
class TrainStats:
    """What one local training call did: mean loss over its last quarter of steps, patches seen, seconds."""

    loss: float
    patches: int
    seconds: float


def parse_loss(spec: str) -> dict[str, float]:
    """``"l1"`` or ``"l1:1.0,ssim:0.1"`` -> {name: weight}."""
    weights: dict[str, float] = {}
    for term in filter(None, (t.strip() for t in spec.split(","))):
        name, _, weight = term.partition(":")
        weights[name.strip()] = float(weight) if weight else 1.0
    if not weights:
        raise ValueError(f"empty loss specification {spec!r}")
    return weights


def train_supervised(
    model: nn.Module,
    sampler: PatchSampler,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    loss: str,
    device: torch.device,
) -> TrainStats:
    """Run ``steps`` Adam steps on sampled patches; the model is updated in place and left on ``device``."""
    criterion = build_loss(parse_loss(loss)).to(device)
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        lr, hr = sampler.batch(batch_size)
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        optimiser.zero_grad(set_to_none=True)
        value = criterion(model(lr), hr)
        if not torch.isfinite(value):
            raise FloatingPointError("training loss became NaN/Inf; lower --learning-rate")
        value.backward()
        optimiser.step()
        losses.append(value.detach())
    tail = torch.stack(losses[-max(1, steps // 4) :]).mean().item()
    return TrainStats(loss=tail, patches=steps * batch_size, seconds=time.perf_counter() - start)
