"""Paired SR data from a site's high-resolution scans: in-plane pairs for 2D models, isotropic pairs for 3D models.

In-plane (:class:`InPlanePairing`): each scan's LR is made with the site's in-plane acquisition model
(:func:`client.degrade.degrade_inplane`), (X, Y, Z) -> (X/s, Y/s, Z); training patches are in-plane squares and the
baseline is bicubic interpolation of each slice. Isotropic (:class:`IsotropicPairing`): LR reduced along every axis
(:func:`client.degrade.degrade_isotropic`); training patches are cubes and the baseline is trilinear interpolation of
the whole volume. Both are scored on the HR's in-plane slices with anatomy.
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

    def pairs(
        self, scan: SiteScan, profile: AcquisitionProfile, scale: int, rng: np.random.Generator, site: Site
    ) -> list[ScanPair]:
        degrade = degrade_inplane if self.spatial_dims == 2 else degrade_isotropic
        hr, lr = degrade(scan.image, profile, scale, scan.volume.spacing, rng)
        return [ScanPair(scan.volume.subject, hr, lr, **pair_geometry(scan, hr))]

    def sampler(self, pairs: Sequence[ScanPair], scale: int, patch_size: int, rng: np.random.Generator) -> PatchSampler:
        return PatchSampler(pairs, scale, patch_size, rng, spatial_dims=self.spatial_dims)

    def num_examples(self, pairs: Sequence[ScanPair]) -> int:
        """HR slices of the training scans."""
        return sum(pair.hr.shape[2] for pair in pairs)

    def restored(
        self, model: nn.Module, pair: ScanPair, *, device: torch.device, max_slices: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index = evaluation_slices(pair.hr, max_slices)
        sr = super_resolve(model, pair.lr, device=device, slices=index)  # 3D: only the tiles these slices need
        return as_batch(sr), as_batch(pair.hr[:, :, index])

    def baseline(self, pair: ScanPair, *, max_slices: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = evaluation_slices(pair.hr, max_slices)
        scale = pair.hr.shape[0] // pair.lr.shape[0]
        if self.spatial_dims == 3:  # trilinear on the whole volume, then the scored slices
            volume = upsample_baseline(torch.from_numpy(pair.lr)[None, None], scale)[0, 0].numpy()
            interpolated = as_batch(volume[:, :, index])
        else:
            interpolated = upsample_baseline(as_batch(pair.lr[:, :, index]), scale)
        return interpolated, as_batch(pair.hr[:, :, index])


@dataclass(frozen=True)
class IsotropicPairing(InPlanePairing):
    """3D models: SR along every axis, in tiles."""

    baseline_method = "trilinear"
    spatial_dims = 3


def paired_for(spatial_dims: int) -> Pairing:
    """The pairing of a paired-data model with ``spatial_dims`` 2 or 3."""
    return IsotropicPairing() if spatial_dims == 3 else InPlanePairing()
