"""Training and evaluation data for one-axis (SMORE-style) super-resolution, at paired and self-supervised sites.

Both kinds of site produce the same training pairs for the same network: 2D patches whose LAST axis was acquired
with the site's slice profile and subsampled by ``scale`` -- LR (B, 1, P, p) -> HR (B, 1, P, scale*p).

* Paired site (``supervision = "paired"``, the default; thin-slice HR scans): each scan becomes a through-plane
  pair with :func:`client.degrade.degrade_throughplane`: HR (X, Y, s*Z') and LR (X, Y, Z') (thick slices with the
  site's profile and noise). Training patches are planes that contain Z: (Y, Z) planes (one per x) and (X, Z)
  planes (one per y). Validation: the whole LR volume restored through-plane
  (:func:`shared_models.smore.super_resolve_through_plane`), scored on axial (X, Y) slices against HR.
* Self-supervised site (``supervision = "self"``; its scans are the thick-slice acquisitions themselves, high
  resolution in-plane only): SMORE's idea -- the in-plane axes are degraded the way the scanner degrades Z. Each
  scan (X, Y, Z') yields an in-plane pair per in-plane axis: HR = the scan (cropped so X and Y are multiples of
  ``scale``), LR = the scan acquired along Y (resp. X) with the site's slice profile and subsampled by ``scale``
  (:func:`client.degrade.slice_profile_subsample`, FWHM = the profile's ``slice_thickness_mm``, at least
  ``scale`` x the in-plane spacing, exactly as ``degrade_throughplane`` chooses it; no noise is added, the
  scan already carries the scanner's). Training patches are in-plane (X, Y) slices, degraded axis last.
  Validation and test: the self-supervised proxy -- those scans' in-plane slices degraded along Y, restored,
  scored against the original slices (the through-plane truth does not exist at such a site).

Representation: :class:`AxisPair` is a :class:`client.pairs.ScanPair` whose ``lr`` is ``hr`` reduced by ``scale``
along one axis (``axis``) only, with ``across``, the axes that may span a training plane together with ``axis``.
:class:`AxisPairing` is the :class:`client.pairs.Pairing` that makes, samples and scores them; sites are prepared
once per process by :func:`client.pairs.prepare_site`, as for every family.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from client.data.errors import SiteError
from client.data.files import SITE_CONFIG_NAME
from client.data.site import Site, SiteScan
from client.degrade import AcquisitionProfile, degrade_throughplane, slice_profile_subsample
from client.evaluation import evaluation_slices
from client.pairs import Pairing, ScanPair, pair_geometry
from client.training import FOREGROUND_LEVEL, PairedPatches
from shared_models.smore import interpolate_through_plane, super_resolve_planes, super_resolve_through_plane

log = logging.getLogger(__name__)

#: ``site.toml`` ``supervision`` values this module understands.
SUPERVISION_MODES = ("paired", "self")
#: Self-supervised sites whose slice spacing / in-plane spacing differs from the scale by more than this
#: fraction get a warning: the restored volume will not be isotropic.
SPACING_TOLERANCE = 0.25


@dataclass(frozen=True, eq=False)
class AxisPair(ScanPair):
    """A scan as a one-axis SR pair.

    ``hr``: float32 3D array in [0, 1]. ``lr``: float32, ``hr`` acquired along ``axis`` with the site's slice
    profile and subsampled by the scale (every other axis unchanged). ``across``: the axes that may run along a
    training patch's first dimension (the patch plane is spanned by ``across[i]`` and ``axis``; the remaining
    axis is held fixed). Paired site: ``hr`` thin (X, Y, s*Z'), ``lr`` (X, Y, Z'), axis 2, across (0, 1).
    Self-supervised site: ``hr`` the acquired thick scan (X, Y, Z'), ``lr`` (X, Y/s, Z') with axis 1, across (0,)
    (or (X/s, Y, Z') with axis 0, across (1,)). Compared and hashed by identity, like ScanPair.
    """

    axis: int
    across: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.hr.ndim != 3 or self.lr.ndim != 3:
            raise ValueError(f"{self.subject}: hr and lr must be 3D, got {self.hr.shape} and {self.lr.shape}")
        valid_across = all(a in (0, 1, 2) and a != self.axis for a in self.across)
        if self.axis not in (0, 1, 2) or not self.across or not valid_across:
            raise ValueError(f"{self.subject}: bad axis {self.axis} / across {self.across}")
        expected = list(self.hr.shape)
        expected[self.axis] = self.lr.shape[self.axis]
        reduced = self.lr.shape[self.axis] >= 1 and self.hr.shape[self.axis] % self.lr.shape[self.axis] == 0
        if not reduced or tuple(expected) != self.lr.shape:
            raise ValueError(f"{self.subject}: lr {self.lr.shape} is not hr {self.hr.shape} reduced along {self.axis}")

    def _plane_order(self, across: int) -> tuple[int, int, int]:
        """(fixed axis, ``across``, ``axis``): the volume axes that become a plane stack's axes 0, 1, 2."""
        return 3 - self.axis - across, across, self.axis

    def as_planes(self, volume: np.ndarray, across: int) -> np.ndarray:
        """A view (no copy) of ``volume`` (the HR or the LR grid) as a stack of planes (N, A, L): N along the
        fixed axis, A along ``across``, L along ``axis`` (the degraded axis last)."""
        return np.moveaxis(volume, self._plane_order(across), (0, 1, 2))

    def from_planes(self, planes: np.ndarray, across: int) -> np.ndarray:
        """The inverse of :meth:`as_planes`: a stack of planes (N, A, L) back in (X, Y, Z) layout (a view)."""
        return np.moveaxis(planes, (0, 1, 2), self._plane_order(across))

    def planes(self, across: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of HR and LR as stacks of planes (:meth:`as_planes`)."""
        return self.as_planes(self.hr, across), self.as_planes(self.lr, across)

    @property
    def num_planes(self) -> int:
        """Distinct 2D training planes: for each ``across`` axis, the size of the axis held fixed."""
        return sum(self.hr.shape[3 - self.axis - b] for b in self.across)


# --------------------------------------------------------------------------------------------- pairs


def selfsup_thickness_mm(profile: AcquisitionProfile, scale: int, spacing_mm: float) -> float:
    """Slice-profile FWHM (mm) that mimics the site's slice acquisition along an axis of HR spacing
    ``spacing_mm``: the profile's ``slice_thickness_mm``, but at least contiguous slices (``scale * spacing``),
    the rule of :func:`client.degrade.degrade_throughplane`."""
    return max(profile.slice_thickness_mm or 0.0, scale * float(spacing_mm))


def through_plane_pair(scan: SiteScan, profile: AcquisitionProfile, scale: int, rng: np.random.Generator) -> AxisPair:
    """A thin-slice scan (X, Y, Z) -> HR (X, Y, s*Z') / LR (X, Y, Z') through ``degrade_throughplane``."""
    hr, lr = degrade_throughplane(scan.image, profile, scale, scan.volume.spacing, rng)
    return AxisPair(scan.volume.subject, hr, lr, **pair_geometry(scan, hr), axis=2, across=(0, 1))


def inplane_pair(scan: SiteScan, profile: AcquisitionProfile, scale: int, axis: int) -> AxisPair:
    """A thick-slice scan (X, Y, Z') -> in-plane pair degraded along ``axis`` (0 or 1).

    HR: the scan centre-cropped so X and Y are multiples of ``scale``. LR: :func:`acquire_inplane` of that.
    """
    if axis not in (0, 1):
        raise ValueError(f"in-plane axis must be 0 (X) or 1 (Y), got {axis}")
    hr = _centre_crop_inplane(np.asarray(scan.image, dtype=np.float32), scale)
    lr = acquire_inplane(hr, profile, scale, axis, scan.volume.spacing)
    return AxisPair(scan.volume.subject, hr, lr, **pair_geometry(scan, hr), axis=axis, across=(1 - axis,))


def acquire_inplane(
    hr: np.ndarray, profile: AcquisitionProfile, scale: int, axis: int, spacing: Sequence[float]
) -> np.ndarray:
    """A self-supervised site's acquisition along in-plane ``axis``: ``slice_profile_subsample`` of ``hr`` with
    FWHM :func:`selfsup_thickness_mm` of that axis' spacing (``spacing``: HR voxel size, mm), clipped to [0, 1].
    No noise: the scan already carries the scanner's."""
    thickness = selfsup_thickness_mm(profile, scale, spacing[axis])
    lr = slice_profile_subsample(hr, scale, axis, thickness, float(spacing[axis]), profile.slice_profile)
    return np.clip(lr, 0.0, 1.0)


def _centre_crop_inplane(vol: np.ndarray, scale: int) -> np.ndarray:
    index = []
    for n in vol.shape[:2]:
        extra = n % scale
        index.append(slice(extra // 2, n - (extra - extra // 2)))
    return np.ascontiguousarray(vol[tuple(index)])


def _check_thick_spacing(site: str, subject: str, spacing: Sequence[float], scale: int) -> None:
    inplane = min(spacing[0], spacing[1])
    ratio = spacing[2] / inplane
    if abs(ratio - scale) > SPACING_TOLERANCE * scale:
        log.warning(
            "site %s, %s: slices are %.3g mm apart with %.3g mm in-plane pixels (ratio %.2f) but the scale is %d: "
            "restored volumes will have %.3g mm slices, not isotropic voxels",
            site, subject, spacing[2], inplane, ratio, scale, spacing[2] / scale,
        )


# --------------------------------------------------------------------------------------------- sampling


class PlaneSampler(PairedPatches):
    """Draws aligned (LR, HR) 2D patches, degraded axis last, from :class:`AxisPair` planes.

    HR patches are ``P x s*p`` and LR ``P x p`` with ``P = patch_size`` and ``p = patch_size // scale``, each
    reduced to what the smallest plane allows (thick-slice volumes are short along Z). Each draw picks a plane
    uniformly over all planes of all pairs, then a position, re-draws background patches a few times, and flips
    the patch along either axis (LR and HR alike); it never transposes, so the degraded axis stays last.
    ``.batch(size)`` gives LR (B, 1, P, p) and HR (B, 1, P, s*p).
    """

    def __init__(self, pairs: Sequence[AxisPair], scale: int, patch_size: int, rng: np.random.Generator):
        if not pairs:
            raise ValueError("PlaneSampler needs at least one pair")
        self.scale = int(scale)
        self.sources: list[tuple[str, np.ndarray, np.ndarray]] = []
        for pair in pairs:
            if pair.scale != self.scale:
                raise ValueError(f"scan {pair.subject}: pair made for scale {pair.scale}, sampler for {self.scale}")
            for across in pair.across:
                self.sources.append((pair.subject, *pair.planes(across)))
        self.across_size = min(int(patch_size), *(hr.shape[1] for _, hr, _ in self.sources))
        self.lr_size = min(int(patch_size) // self.scale, *(lr.shape[2] for _, _, lr in self.sources))
        if self.lr_size < 1 or self.across_size < 1:
            raise ValueError(f"patch size {patch_size} gives empty patches at scale {self.scale}")
        counts = np.array([hr.shape[0] for _, hr, _ in self.sources], dtype=np.float64)
        self.weights = counts / counts.sum()
        self.rng = rng

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """LR (P, p) and HR (P, s*p), the degraded axis last."""
        s, p, size = self.scale, self.lr_size, self.across_size
        for _attempt in range(10):
            _, hr_planes, lr_planes = self.sources[self.rng.choice(len(self.sources), p=self.weights)]
            k = self.rng.integers(hr_planes.shape[0])
            a = self.rng.integers(hr_planes.shape[1] - size + 1)
            b = self.rng.integers(lr_planes.shape[2] - p + 1)
            hr = hr_planes[k, a : a + size, b * s : (b + p) * s]
            if hr.max() >= FOREGROUND_LEVEL:
                break
        lr = lr_planes[k, a : a + size, b : b + p]
        flip = self.rng.integers(4)
        if flip & 1:
            lr, hr = lr[::-1], hr[::-1]
        if flip & 2:  # the slice profile is symmetric and LR samples sit at block centres: flipping keeps them aligned
            lr, hr = lr[:, ::-1], hr[:, ::-1]
        return lr, hr


# --------------------------------------------------------------------------------------------- scoring


def _as_batch(planes: np.ndarray) -> torch.Tensor:
    """(N, H, W) planes -> (N, 1, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(planes[:, None], dtype=np.float32))


def _degraded_last(pair: AxisPair, volume: np.ndarray, max_slices: int) -> torch.Tensor:
    """The planes of ``volume`` (HR grid) spanned by ``pair.across[0]`` and the degraded axis (last), at the
    positions along the fixed axis that :func:`client.evaluation.evaluation_slices` picks in ``pair.hr``:
    (N, 1, A, L)."""
    across = pair.across[0]
    index = evaluation_slices(np.moveaxis(pair.as_planes(pair.hr, across), 0, 2), max_slices)
    return _as_batch(pair.as_planes(volume, across)[index])


@dataclass(frozen=True)
class AxisPairing(Pairing):
    """One-axis pairs at paired and self-supervised sites, sampled as planes with the degraded axis last.

    Restoring and scoring: through-plane pairs (paired sites) are restored through-plane as a whole volume and
    scored on their axial (X, Y) slices; in-plane pairs (self-supervised sites) are restored plane by plane along
    their degraded axis and scored on those planes against the original slices (the proxy). The baseline is 1D
    cubic interpolation along the restored axis. High-frequency excess is measured on planes with the degraded
    axis last, in the band beyond the LR grid along that axis.
    """

    baseline_method = "cubic-1d"

    def accepts(self, site: Site) -> None:
        if site.config.supervision not in SUPERVISION_MODES:
            raise SiteError(
                site.directory / SITE_CONFIG_NAME,
                f"supervision {site.config.supervision!r} is not supported by one-axis models",
                f"use one of {', '.join(SUPERVISION_MODES)}",
            )

    def pairs(
        self, scan: SiteScan, profile: AcquisitionProfile, scale: int, rng: np.random.Generator, site: Site
    ) -> list[ScanPair]:
        """Paired site: one through-plane pair per scan. Self-supervised site: a train scan gives two in-plane
        pairs (degraded along Y and along X), a validation or test scan one (along Y, the proxy)."""
        if site.config.supervision == "paired":
            return [through_plane_pair(scan, profile, scale, rng)]
        _check_thick_spacing(site.config.name, scan.volume.subject, scan.volume.spacing, scale)
        axes = (1, 0) if scan.split == "train" else (1,)
        return [inplane_pair(scan, profile, scale, axis) for axis in axes]

    def sampler(self, pairs: Sequence[ScanPair], scale: int, patch_size: int, rng: np.random.Generator) -> PlaneSampler:
        return PlaneSampler(_axis_pairs(pairs), scale, patch_size, rng)

    def num_examples(self, pairs: Sequence[ScanPair]) -> int:
        """Distinct 2D training planes."""
        return sum(pair.num_planes for pair in _axis_pairs(pairs))

    def restore(self, model: nn.Module, pair: ScanPair, *, device: torch.device) -> np.ndarray:
        """Through-plane pairs: the whole LR volume restored through-plane. In-plane pairs: every plane along
        ``across[0]`` restored along the degraded axis, put back in (X, Y, Z) layout."""
        (pair,) = _axis_pairs([pair])
        if pair.axis == 2:
            return super_resolve_through_plane(model, pair.lr, device=device)
        across = pair.across[0]
        planes = super_resolve_planes(model, pair.as_planes(pair.lr, across), device=device)
        return np.ascontiguousarray(pair.from_planes(planes, across))

    def interpolate(self, pair: ScanPair) -> np.ndarray:
        """1D cubic interpolation along the degraded axis."""
        (pair,) = _axis_pairs([pair])
        planes = pair.as_planes(pair.lr, pair.across[0])  # the degraded axis last, as interpolate_through_plane wants
        return np.ascontiguousarray(pair.from_planes(interpolate_through_plane(planes, pair.scale), pair.across[0]))

    def acquire(
        self, pair: ScanPair, volume: np.ndarray, profile: AcquisitionProfile, spacing: Sequence[float],
        rng: np.random.Generator,
    ) -> np.ndarray:
        (pair,) = _axis_pairs([pair])
        if pair.axis == 2:
            return degrade_throughplane(volume, profile, pair.scale, spacing, rng)[1]  # HR grid: nothing cropped
        return acquire_inplane(volume, profile, pair.scale, pair.axis, spacing)

    def scored(self, pair: ScanPair, volume: np.ndarray, *, max_slices: int) -> torch.Tensor:
        """Through-plane pairs: axial (X, Y) slices with anatomy. In-plane pairs: the planes with the degraded
        axis last (the proxy's slices)."""
        (pair,) = _axis_pairs([pair])
        if pair.axis == 2:
            return super().scored(pair, volume, max_slices=max_slices)
        return _degraded_last(pair, volume, max_slices)

    def excess_planes(
        self, pair: ScanPair, volume: np.ndarray, *, max_slices: int
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Planes with the degraded axis last, coarser along it only."""
        (pair,) = _axis_pairs([pair])
        return _degraded_last(pair, volume, max_slices), (-1,)


def _axis_pairs(pairs: Sequence[ScanPair]) -> list[AxisPair]:
    """``pairs`` checked to be :class:`AxisPair` (a site prepared with another pairing is a programming error)."""
    wrong = [type(p).__name__ for p in pairs if not isinstance(p, AxisPair)]
    if wrong:
        raise TypeError(f"one-axis pairing needs AxisPair, got {wrong[0]}")
    return list(pairs)
