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
  Validation: the self-supervised proxy -- validation scans' in-plane slices degraded along Y, restored, scored
  against the original slices (the through-plane truth does not exist at such a site).

Representation: :class:`AxisPair` is a :class:`client.pairs.ScanPair` whose ``lr`` is ``hr`` reduced by ``scale``
along one axis (``axis``) only, with ``across``, the axes that may span a training plane together with ``axis``.
Everything is precomputed once per (site folder, scale) and cached for the process, as
:func:`client.pairs.prepare_site` does. :class:`SmoreSite` is a :class:`client.pairs.PreparedSite` that also says
which kind of site it is.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from client.data.errors import SiteError
from client.data.files import SITE_CONFIG_NAME
from client.data.site import Site, load_site
from client.degrade import AcquisitionProfile, degrade_throughplane, profile_from_config, slice_profile_subsample
from client.evaluation import METRIC_KEYS, evaluation_slices
from client.pairs import PreparedSite, ScanPair, require_train_and_val, site_seed
from client.training import FOREGROUND_LEVEL
from shared_models.metrics import score
from shared_models.smore import interpolate_through_plane, super_resolve_planes, super_resolve_through_plane

log = logging.getLogger(__name__)

#: ``site.toml`` ``supervision`` values this module understands.
SUPERVISION_MODES = ("paired", "self")
#: ``PreparedSite.geometry`` of a site prepared here: LR differs from HR along one axis only (Z for a paired site,
#: an in-plane axis for a self-supervised one).
GEOMETRY = "one-axis"
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

    @property
    def scale(self) -> int:
        return self.hr.shape[self.axis] // self.lr.shape[self.axis]

    def planes(self, across: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (no copy) of HR and LR as stacks of planes (N, A, L): N along the fixed axis, A along
        ``across``, L along ``axis`` (the degraded axis last)."""
        fixed = 3 - self.axis - across
        order = (fixed, across, self.axis)
        return np.moveaxis(self.hr, order, (0, 1, 2)), np.moveaxis(self.lr, order, (0, 1, 2))

    @property
    def num_planes(self) -> int:
        """Distinct 2D training planes: for each ``across`` axis, the size of the axis held fixed."""
        return sum(self.hr.shape[3 - self.axis - b] for b in self.across)


@dataclass(frozen=True)
class SmoreSite(PreparedSite):
    """A site prepared for one-axis SR: ``geometry`` is :data:`GEOMETRY`, ``train`` / ``val`` hold
    :class:`AxisPair`; ``supervision`` is ``"paired"`` or ``"self"`` (the site's ``site.toml``)."""

    supervision: str = "paired"


# --------------------------------------------------------------------------------------------- pairs


def selfsup_thickness_mm(profile: AcquisitionProfile, scale: int, spacing_mm: float) -> float:
    """Slice-profile FWHM (mm) that mimics the site's slice acquisition along an axis of HR spacing
    ``spacing_mm``: the profile's ``slice_thickness_mm``, but at least contiguous slices (``scale * spacing``),
    the rule of :func:`client.degrade.degrade_throughplane`."""
    return max(profile.slice_thickness_mm or 0.0, scale * float(spacing_mm))


def through_plane_pair(
    subject: str,
    hr: np.ndarray,
    profile: AcquisitionProfile,
    scale: int,
    spacing: Sequence[float],
    rng: np.random.Generator,
) -> AxisPair:
    """A thin-slice scan (X, Y, Z) -> HR (X, Y, s*Z') / LR (X, Y, Z') through ``degrade_throughplane``."""
    hr_cropped, lr = degrade_throughplane(hr, profile, scale, spacing, rng)
    return AxisPair(subject, hr_cropped, lr, axis=2, across=(0, 1))


def inplane_pair(
    subject: str, thick: np.ndarray, profile: AcquisitionProfile, scale: int, spacing: Sequence[float], axis: int
) -> AxisPair:
    """A thick-slice scan (X, Y, Z') -> in-plane pair degraded along ``axis`` (0 or 1).

    HR: the scan centre-cropped so X and Y are multiples of ``scale``. LR: ``slice_profile_subsample`` of that
    along ``axis`` with FWHM :func:`selfsup_thickness_mm` of that axis' spacing, clipped to [0, 1].
    """
    if axis not in (0, 1):
        raise ValueError(f"in-plane axis must be 0 (X) or 1 (Y), got {axis}")
    hr = _centre_crop_inplane(np.asarray(thick, dtype=np.float32), scale)
    thickness = selfsup_thickness_mm(profile, scale, spacing[axis])
    lr = slice_profile_subsample(hr, scale, axis, thickness, float(spacing[axis]), profile.slice_profile)
    return AxisPair(subject, hr, np.clip(lr, 0.0, 1.0), axis=axis, across=(1 - axis,))


def _centre_crop_inplane(vol: np.ndarray, scale: int) -> np.ndarray:
    index = []
    for n in vol.shape[:2]:
        extra = n % scale
        index.append(slice(extra // 2, n - (extra - extra // 2)))
    return np.ascontiguousarray(vol[tuple(index)])


def site_supervision(site: Site) -> str:
    """The site's ``supervision`` ("paired" or "self"); SiteError naming site.toml for anything else."""
    mode = site.config.supervision
    if mode not in SUPERVISION_MODES:
        raise SiteError(
            site.directory / SITE_CONFIG_NAME,
            f"supervision {mode!r} is not supported by the one-axis (smore) model",
            f"use one of {', '.join(SUPERVISION_MODES)}",
        )
    return mode


@functools.lru_cache(maxsize=8)
def prepare_smore_site(site_dir: str, scale: int) -> SmoreSite:
    """Load a site folder once and build its one-axis pairs (cached per process).

    Paired site: one through-plane :class:`AxisPair` per train / val scan (LR noise drawn from a per-site seed).
    Self-supervised site: train scans give two in-plane pairs (degraded along Y and along X), val scans one
    (along Y, the validation proxy).

    Raises :class:`SiteError` when the folder is missing, empty or has nothing usable, when its supervision is
    unknown, or when the train or val split is empty.
    """
    site = load_site(Path(site_dir))
    supervision = site_supervision(site)
    profile = profile_from_config(site.config.acquisition, site.config.modality)
    rng = np.random.default_rng(site_seed(site.config.name, site.config.split_seed))
    splits: dict[str, list[AxisPair]] = {"train": [], "val": []}
    for scan in site.scans:
        if scan.split not in splits:
            continue
        subject, spacing = scan.volume.subject, scan.volume.spacing
        if supervision == "paired":
            splits[scan.split].append(through_plane_pair(subject, scan.image, profile, scale, spacing, rng))
            continue
        _check_thick_spacing(site.config.name, subject, spacing, scale)
        axes = (1, 0) if scan.split == "train" else (1,)
        splits[scan.split].extend(inplane_pair(subject, scan.image, profile, scale, spacing, a) for a in axes)
    require_train_and_val(site, splits)
    log.info(
        "site %s (%s supervision, one-axis x%d): %d train and %d val pairs, %d files skipped",
        site.config.name, supervision, scale, len(splits["train"]), len(splits["val"]), len(site.skipped),
    )
    return SmoreSite(
        name=site.config.name,
        directory=site.directory,
        scale=scale,
        geometry=GEOMETRY,
        train=tuple(splits["train"]),
        val=tuple(splits["val"]),
        skipped=tuple(site.skipped),
        supervision=supervision,
    )


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


class PlaneSampler:
    """Draws aligned (LR, HR) 2D patches, degraded axis last, from :class:`AxisPair` planes.

    HR patches are ``P x s*p`` and LR ``P x p`` with ``P = patch_size`` and ``p = patch_size // scale``, each
    reduced to what the smallest plane allows (thick-slice volumes are short along Z). Each draw picks a plane
    uniformly over all planes of all pairs, then a position, re-draws background patches a few times, and flips
    the patch along either axis (LR and HR alike); it never transposes, so the degraded axis stays last.
    ``.batch(size)`` has the interface of :class:`client.training.PatchSampler`.
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

    def _draw_one(self) -> tuple[np.ndarray, np.ndarray]:
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

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: LR (B, 1, P, p) and HR (B, 1, P, s*p), float32 in [0, 1]."""
        lrs, hrs = zip(*(self._draw_one() for _ in range(size)))
        lr = torch.from_numpy(np.ascontiguousarray(np.stack(lrs)[:, None]))
        hr = torch.from_numpy(np.ascontiguousarray(np.stack(hrs)[:, None]))
        return lr, hr


def training_planes(pairs: Sequence[AxisPair]) -> int:
    """Distinct 2D training planes of a site (its ``num-examples``)."""
    return sum(pair.num_planes for pair in pairs)


# --------------------------------------------------------------------------------------------- evaluation


def _as_batch(planes: np.ndarray) -> torch.Tensor:
    """(N, H, W) planes -> (N, 1, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(planes[:, None], dtype=np.float32))


def _axial(volume: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> the (X, Y) slices at ``index`` as (N, X, Y)."""
    return np.moveaxis(volume[:, :, index], 2, 0)


def _scored_planes(pair: AxisPair, max_slices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validation planes of an in-plane (self-supervised) pair: HR (N, A, s*L), LR (N, A, L), and the slice
    indices (along the fixed axis) picked by :func:`client.evaluation.evaluation_slices`."""
    hr_planes, lr_planes = pair.planes(pair.across[0])
    index = evaluation_slices(np.moveaxis(hr_planes, 0, 2), max_slices)
    return hr_planes[index], lr_planes[index], index


@functools.lru_cache(maxsize=64)
def _baseline_scores(pair: AxisPair, max_slices: int) -> dict[str, float]:
    """Interpolation-baseline metrics of a validation pair (fixed for the run: computed once per process)."""
    if pair.axis == 2:
        index = evaluation_slices(pair.hr, max_slices)
        baseline = _axial(interpolate_through_plane(pair.lr, pair.scale), index)
        hr = _axial(pair.hr, index)
    else:
        hr, lr, _ = _scored_planes(pair, max_slices)
        baseline = interpolate_through_plane(lr, pair.scale)  # interpolation along the last axis of each plane
    return {f"bicubic_{k}": v for k, v in score(_as_batch(baseline), _as_batch(hr)).items()}


def evaluate_axis_pairs(
    model: nn.Module, pairs: Sequence[AxisPair], *, device: torch.device | str, max_slices: int, batch_size: int = 16
) -> dict[str, float]:
    """Mean PSNR (dB), SSIM, NRMSE, HFEN of a one-axis model and of the interpolation baseline (``bicubic_*``).

    Through-plane pairs (axis 2, paired sites): the LR volume is restored through-plane (both orientations,
    averaged) and scored on its axial (X, Y) slices. In-plane pairs (self-supervised sites): the LR in-plane
    slices are restored along their degraded axis and scored against the original slices (the proxy).
    Slices are those with anatomy, at most ``max_slices`` per scan; 2D metrics are averaged per scan, then scans
    with equal weight. Returns the keys of :func:`client.evaluation.evaluate_pairs`: ``METRIC_KEYS`` plus
    ``num_val_scans``, ``num_val_slices`` and ``eval_seconds``.
    """
    if not pairs:
        raise ValueError("evaluation needs at least one validation pair")
    start = time.perf_counter()
    per_scan, total_slices = [], 0
    for pair in pairs:
        if pair.axis == 2:
            index = evaluation_slices(pair.hr, max_slices)
            sr = _axial(super_resolve_through_plane(model, pair.lr, device=device, batch_size=batch_size), index)
            hr = _axial(pair.hr, index)
        else:
            hr, lr, index = _scored_planes(pair, max_slices)
            sr = super_resolve_planes(model, lr, device=device, batch_size=batch_size)
        scores = score(_as_batch(sr), _as_batch(hr))
        scores.update(_baseline_scores(pair, max_slices))
        per_scan.append([scores[k] for k in METRIC_KEYS])
        total_slices += len(index)
    means = np.mean(np.asarray(per_scan, dtype=np.float64), axis=0)
    result: dict[str, float] = {k: float(v) for k, v in zip(METRIC_KEYS, means)}
    result.update(num_val_scans=len(pairs), num_val_slices=total_slices, eval_seconds=time.perf_counter() - start)
    return result
