"""Local training at one site: patch sampling from the site's train split, the supervised loop and FedProx's
proximal term."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from client.device import memory_format
from shared_models.losses import loss_from_spec

if TYPE_CHECKING:
    from client.pairs import BatchSource, ScanPair

#: A patch whose brightest HR voxel is below this (normalised units) is background and is re-drawn.
FOREGROUND_LEVEL = 0.05
#: Steps between checks that the training loss is finite. A check waits for the GPU; checking every step made
#: training of a base-preset 2D CNN on an H100 25 % slower than a loop without it (benchmarks/gpu_check.py). A NaN found
#: late is as final: the round fails and its weights are never sent.
FINITE_CHECK_EVERY = 20


class PairedPatches(ABC):
    """Base of the samplers: ``batch(size)`` stacks ``size`` draws of :meth:`draw` into (B, 1, ...) tensors."""

    @abstractmethod
    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """One aligned (LR, HR) patch pair, float32 arrays."""

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: LR and HR as (B, 1, ...) float32 tensors in [0, 1]."""
        lrs, hrs = zip(*(self.draw() for _ in range(size)))
        lr = torch.from_numpy(np.ascontiguousarray(np.stack(lrs)[:, None]))
        hr = torch.from_numpy(np.ascontiguousarray(np.stack(hrs)[:, None]))
        return lr, hr


class PatchSampler(PairedPatches):
    """Draws aligned (LR, HR) patches from a site's scan pairs: 2D in-plane squares or 3D cubes.

    ``hr_size`` is the HR patch side in voxels; LR patches are ``hr_size // scale``. Each draw picks a scan
    (weighted by its number of slices), a position (for 2D a slice too), re-draws background patches a few
    times, and applies the same random flips (and, in 2D, transposition) to LR and HR. In 3D the scan's LR must
    be scaled along every axis (:class:`client.paired.IsotropicPairing`).
    """

    def __init__(
        self, pairs: Sequence[ScanPair], scale: int, hr_size: int, rng: np.random.Generator, spatial_dims: int = 2
    ):
        if not pairs:
            raise ValueError("PatchSampler needs at least one scan pair")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.pairs = list(pairs)
        self.scale = scale
        self.lr_size = hr_size // scale
        self.spatial_dims = spatial_dims
        for pair in self.pairs:
            if min(pair.lr.shape[:spatial_dims]) < self.lr_size:
                raise ValueError(
                    f"scan {pair.subject}: size {pair.hr.shape[:spatial_dims]} is smaller than the patch size "
                    f"{hr_size}; lower --patch-size"
                )
        slices = np.array([p.hr.shape[2] for p in self.pairs], dtype=np.float64)
        self.weights = slices / slices.sum()
        self.rng = rng

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """LR (p, p[, p]) and HR (s*p, s*p[, s*p])."""
        s, p, dims = self.scale, self.lr_size, self.spatial_dims
        for _attempt in range(10):
            pair = self.pairs[self.rng.choice(len(self.pairs), p=self.weights)]
            corner = [int(self.rng.integers(n - p + 1)) for n in pair.lr.shape[:dims]]
            lr_index = tuple(slice(c, c + p) for c in corner)
            hr_index = tuple(slice(c * s, (c + p) * s) for c in corner)
            if dims == 2:
                z = int(self.rng.integers(pair.lr.shape[2]))
                lr_index, hr_index = lr_index + (z,), hr_index + (z,)
            hr = pair.hr[hr_index]
            if hr.max() >= FOREGROUND_LEVEL:
                break
        lr = pair.lr[lr_index]
        for axis in range(dims):
            if self.rng.integers(2):
                lr, hr = np.flip(lr, axis), np.flip(hr, axis)
        if dims == 2 and self.rng.integers(2):
            lr, hr = lr.T, hr.T
        return lr, hr


class ProximalTerm:
    """FedProx's proximal term ``(mu / 2) * sum_i ||w_i - w_global_i||^2`` over some parameters, ``w_global`` their
    values when the term is made (made right after the coordinator's weights are loaded: the weights received).

    It enters training through its gradient, ``mu * (w - w_global)``, which :meth:`add_to_gradients` adds to each
    parameter's ``.grad`` after the backward pass of the task's loss: the gradient of loss + term, exactly, without
    the term in the autograd graph. The DP paths add it after clipping and noise: it depends on no training data
    (only on the weights and on what the coordinator sent), so it costs no privacy. Reported losses leave it out,
    so they compare across strategies.
    """

    def __init__(self, mu: float, parameters: Iterable[nn.Parameter], device: torch.device) -> None:
        self.mu = float(mu)
        self.received = [(p, p.detach().to(device, copy=True)) for p in parameters]

    @classmethod
    def over(
        cls, model: nn.Module, travelling: Collection[str], mu: float, device: torch.device,
        within: nn.Module | None = None,
    ) -> ProximalTerm | None:
        """The term over ``model``'s trainable parameters whose names (``model.named_parameters()``) are in
        ``travelling``, only those of its sub-module ``within`` when given; None when there is no such parameter.
        The snapshot is on ``device``, where training will run."""
        part = {id(p) for p in (within if within is not None else model).parameters()}
        chosen = [p for name, p in model.named_parameters()
                  if name in travelling and p.requires_grad and id(p) in part]
        return cls(mu, chosen, device) if chosen else None

    @torch.no_grad()
    def add_to_gradients(self) -> None:
        """``p.grad += mu * (p - p_received)`` for every parameter of the term (``p.grad`` set when it is None)."""
        for p, received in self.received:
            pull = (p - received).mul_(self.mu)
            if p.grad is None:
                p.grad = pull
            else:
                p.grad.add_(pull)


@dataclass(frozen=True)
class TrainStats:
    """What one local training call did: mean loss over its last quarter of steps, patches seen, seconds."""

    loss: float
    patches: int
    seconds: float


def train_supervised(
    model: nn.Module,
    sampler: BatchSource,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    loss: str,
    device: torch.device,
    proximal: ProximalTerm | None = None,
) -> TrainStats:
    """Run ``steps`` Adam steps on sampled patches; the model is updated in place and left on ``device``.
    ``proximal``: FedProx's term added to the loss (its gradient to every step's), None for plain local training.

    On CUDA the model and batches are channels-last (float32; see client/device.py for why not bfloat16); on the CPU
    the default layout, and for a fixed seed the run is deterministic.
    """
    criterion = loss_from_spec(loss).to(device)
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        lr, hr = sampler.batch(batch_size)
        layout = memory_format(device, lr.ndim)
        if step == 0:
            model.to(memory_format=layout)
        lr = lr.to(device, memory_format=layout, non_blocking=True)
        hr = hr.to(device, non_blocking=True)
        optimiser.zero_grad(set_to_none=True)
        value = criterion(model(lr), hr)
        value.backward()
        if proximal is not None:
            proximal.add_to_gradients()
        optimiser.step()
        losses.append(value.detach())
        if (step + 1) % FINITE_CHECK_EVERY == 0 or step + 1 == steps:
            _check_finite(losses[-FINITE_CHECK_EVERY:])
    tail = torch.stack(losses[-max(1, steps // 4) :]).mean().item()
    return TrainStats(loss=tail, patches=steps * batch_size, seconds=time.perf_counter() - start)


def _check_finite(losses: Sequence[torch.Tensor]) -> None:
    """Raise FloatingPointError when any of the recent steps' losses is NaN or Inf (one wait for the device)."""
    if not bool(torch.isfinite(torch.stack(losses)).all()):
        raise FloatingPointError("training loss became NaN/Inf; lower --learning-rate")
