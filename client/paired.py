"""Paired SR data from a site's high-resolution scans: in-plane pairs for 2D models, isotropic pairs for 3D models.

In-plane (:class:`InPlanePairing`): each scan's LR is made with the site's in-plane acquisition model
(:func:`client.degrade.degrade_inplane`), (X, Y, Z) -> (X/s, Y/s, Z); training patches are in-plane squares and the
baseline is bicubic interpolation of each slice. Isotropic (:class:`IsotropicPairing`): LR reduced along every axis
(:func:`client.degrade.degrade_isotropic`); training patches are cubes and the baseline is trilinear interpolation of
the whole volume. Both are scored on the HR's in-plane slices with anatomy, and an output is acquired again with the
same pipeline that made the LR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from client.data.site import Site, SiteScan
from client.degrade import AcquisitionProfile, degrade_inplane, degrade_isotropic
from client.evaluation import as_batch, evaluation_slices
from client.pairs import Pairing, ScanPair, pair_geometry
from client.training import PatchSampler
from shared_models.inference import super_resolve
from shared_models.resample import upsample_baseline


@dataclass(frozen=True)
class InPlanePairing(Pairing):
    """2D models: in-plane SR of every slice."""

    baseline_method = "bicubic"
    spatial_dims = 2
    #: The acquisition pipeline (HR, profile, scale, spacing, rng) -> (cropped HR, LR).
    degrade = staticmethod(degrade_inplane)

    def pairs(
        self, scan: SiteScan, profile: AcquisitionProfile, scale: int, rng: np.random.Generator, site: Site
    ) -> list[ScanPair]:
        hr, lr = self.degrade(scan.image, profile, scale, scan.volume.spacing, rng)
        return [ScanPair(scan.volume.subject, hr, lr, **pair_geometry(scan, hr))]

    def sampler(self, pairs: Sequence[ScanPair], scale: int, patch_size: int, rng: np.random.Generator) -> PatchSampler:
        return PatchSampler(pairs, scale, patch_size, rng, spatial_dims=self.spatial_dims)

    def num_examples(self, pairs: Sequence[ScanPair]) -> int:
        """HR slices of the training scans."""
        return sum(pair.hr.shape[2] for pair in pairs)

    def restore(self, model: nn.Module, pair: ScanPair, *, device: torch.device) -> np.ndarray:
        """Every slice (2D models) or the whole volume in tiles (3D models)."""
        return super_resolve(model, pair.lr, device=device)

    def restored(
        self, model: nn.Module, pair: ScanPair, *, device: torch.device, max_slices: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the scored slices are computed (3D: only the tiles these slices need): validation every round."""
        index = evaluation_slices(pair.hr, max_slices)
        sr = super_resolve(model, pair.lr, device=device, slices=index)
        return as_batch(sr), self.scored(pair, pair.hr, max_slices=max_slices)

    def interpolate(self, pair: ScanPair) -> np.ndarray:
        """Bicubic interpolation of each slice."""
        interpolated = upsample_baseline(as_batch(pair.lr), pair.scale)
        return np.ascontiguousarray(np.moveaxis(interpolated[:, 0].numpy(), 0, 2))

    def acquire(
        self, pair: ScanPair, volume: np.ndarray, profile: AcquisitionProfile, spacing: Sequence[float],
        rng: np.random.Generator,
    ) -> np.ndarray:
        _, lr = self.degrade(volume, profile, pair.scale, spacing, rng)  # on the HR grid: nothing is cropped
        return lr


@dataclass(frozen=True)
class IsotropicPairing(InPlanePairing):
    """3D models: SR along every axis, in tiles."""

    baseline_method = "trilinear"
    spatial_dims = 3
    degrade = staticmethod(degrade_isotropic)

    def interpolate(self, pair: ScanPair) -> np.ndarray:
        """Trilinear interpolation of the whole volume."""
        return upsample_baseline(torch.from_numpy(pair.lr)[None, None], pair.scale)[0, 0].numpy()


def paired_for(spatial_dims: int) -> Pairing:
    """The pairing of a paired-data model with ``spatial_dims`` 2 or 3."""
    return IsotropicPairing() if spatial_dims == 3 else InPlanePairing()
