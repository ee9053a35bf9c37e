"""A site's scans turned into aligned high/low-resolution pairs, prepared once per process.

The low-resolution image of every scan is synthesised with the site's *own* acquisition model
(``site.toml`` -> :mod:`client.degrade`), so each hospital's data carries its scanner's blur and noise. How a scan
becomes pairs, how pairs are sampled for training, how a model restores a whole scan, how the scan is scored beside
an interpolation baseline and how an output is acquired again (the forward model) is a :class:`Pairing` (in-plane
and isotropic pairs in :mod:`client.paired`, one-axis pairs in :mod:`client.selfsup`); a family's local task picks
one. Loading and degrading happen once per (site folder, scale, pairing) and are cached for the life of the
process: Flower calls the ClientApp every round, and re-reading scans each round would dominate the round time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from client.data.errors import SiteError
from client.data.site import Site, SiteScan, Skipped, load_site
from client.data.siteconfig import SiteConfig
from client.degrade import AcquisitionProfile, profile_from_config
from client.evaluation import as_batch, evaluation_slices
from shared_models.image import Normalisation, ScanImage

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ScanPair:
    """One scan as a training/evaluation pair, with the geometry and intensity mapping of its HR grid.

    ``hr``: float32 (X, Y, Z) in [0, 1], the scan centre-cropped so the reduced axes are multiples of the scale.
    ``lr``: the same anatomy as the site's scanner would acquire it, smaller along the reduced axes.
    ``affine``: (4, 4) voxel -> world mm of ``hr``. ``normalisation``: maps [0, 1] back to scanner units.
    ``patient``: the scan's patient id at the site (the split and DP group by it; it never leaves the site).
    Compared and hashed by identity (a pair is prepared once per process), so results can be cached per pair.
    """

    subject: str
    hr: np.ndarray
    lr: np.ndarray
    affine: np.ndarray
    modality: str
    normalisation: Normalisation
    patient: str

    def hr_image(self) -> ScanImage:
        """``hr`` with its place in the world."""
        return ScanImage(self.hr, self.affine, self.modality, self.normalisation)

    def lr_image(self) -> ScanImage:
        """``lr`` with its place in the world: the HR field of view on the LR grid."""
        return self.hr_image().with_voxels(self.lr)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """HR voxel size (mm) along X, Y, Z, derived from ``affine`` (its column lengths), not stored."""
        return self.hr_image().spacing

    @property
    def scale(self) -> int:
        """HR voxels per LR voxel along the reduced axes (the largest size ratio; 1 along the other axes)."""
        return max(h // n for h, n in zip(self.hr.shape, self.lr.shape))


def scan_image(scan: SiteScan) -> ScanImage:
    """A loaded scan as a :class:`ScanImage` (normalised voxels, the reader's affine, modality and mapping)."""
    return ScanImage(scan.image, scan.volume.affine, scan.volume.modality, scan.normalisation)


def pair_geometry(scan: SiteScan, hr: np.ndarray) -> dict:
    """The :class:`ScanPair` fields of ``hr`` beside its voxels: its geometry, a centre crop of the scan
    (:mod:`client.degrade`'s rule), and its patient (the privacy unit of DP training; never sent)."""
    cropped = scan_image(scan).centre_cropped(hr.shape)
    return {"affine": cropped.affine, "modality": cropped.modality, "normalisation": cropped.normalisation,
            "patient": scan.volume.patient}


class BatchSource(Protocol):
    """Anything that yields aligned (LR, HR) training batches, e.g. :class:`client.training.PatchSampler`."""

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class Pairing(ABC):
    """How a site's scans become training pairs, how pairs are sampled, restored, scored and acquired again.

    Implementations are frozen dataclasses (hashable by value: they key the per-process caches). Volumes "on the
    HR grid" are float32 arrays of ``pair.hr.shape``; scored slices are (N, 1, H, W) tensors.
    """

    #: The interpolation the model's output is compared with (recorded beside the ``baseline-*`` metrics).
    baseline_method: str

    def accepts(self, site: Site) -> None:
        """Raise :class:`SiteError` when this site cannot give such pairs (default: HR scans are required)."""
        if site.config.supervision != "paired":
            raise SiteError(
                site.directory,
                f"site.toml says supervision = {site.config.supervision!r}: its scans are not high-resolution "
                "targets",
                "train a model family that learns from a site's own slices (fedsr models), or remove the site "
                "from this federation",
            )

    @abstractmethod
    def pairs(
        self, scan: SiteScan, profile: AcquisitionProfile, scale: int, rng: np.random.Generator, site: Site
    ) -> list[ScanPair]:
        """The pairs one scan of the site's ``scan.split`` gives (LR noise drawn from ``rng``)."""

    @abstractmethod
    def sampler(self, pairs: Sequence[ScanPair], scale: int, patch_size: int, rng: np.random.Generator) -> BatchSource:
        """Training batches from the train pairs (``patch_size``: HR patch side, pixels)."""

    @abstractmethod
    def num_examples(self, pairs: Sequence[ScanPair]) -> int:
        """The site's training-set size as it reports it (weights its update in the average)."""

    @abstractmethod
    def restore(self, model: nn.Module, pair: ScanPair, *, device: torch.device) -> np.ndarray:
        """The model's output for the whole scan on the HR grid, in [0, 1]."""

    @abstractmethod
    def interpolate(self, pair: ScanPair) -> np.ndarray:
        """The interpolation baseline (:attr:`baseline_method`) of the whole scan on the HR grid, in [0, 1]."""

    @abstractmethod
    def acquire(
        self, pair: ScanPair, volume: np.ndarray, profile: AcquisitionProfile, spacing: Sequence[float],
        rng: np.random.Generator,
    ) -> np.ndarray:
        """``volume`` (HR grid, HR voxel size ``spacing`` mm) through the :mod:`client.degrade` pipeline that made
        ``pair.lr`` with ``profile``: float32 of ``pair.lr.shape``."""

    def reacquire(
        self, pair: ScanPair, volume: np.ndarray, profile: AcquisitionProfile, spacing: Sequence[float]
    ) -> np.ndarray:
        """``volume`` (HR grid) acquired again as the site's scanner acquired ``pair.lr``, without noise (the
        profile with ``noise = "none"``): float32 of ``pair.lr.shape``. ``spacing``: HR voxel size (mm), e.g.
        ``pair.spacing``. For ``volume = pair.hr`` at a site without noise this is ``pair.lr``."""
        volume = np.asarray(volume, dtype=np.float32)
        if volume.shape != pair.hr.shape:
            raise ValueError(f"scan {pair.subject}: volume {volume.shape} is not on the HR grid {pair.hr.shape}")
        noise_free = dataclasses.replace(profile, noise="none")
        return self.acquire(pair, volume, noise_free, spacing, np.random.default_rng(0))  # no noise: never drawn

    def scored(self, pair: ScanPair, volume: np.ndarray, *, max_slices: int) -> torch.Tensor:
        """The slices of ``volume`` (HR grid) that scores are computed on, (N, 1, H, W). Default: the (X, Y)
        slices with anatomy in ``pair.hr`` (:func:`client.evaluation.evaluation_slices`), as (N, 1, X, Y)."""
        return as_batch(volume[:, :, evaluation_slices(pair.hr, max_slices)])

    def excess_planes(
        self, pair: ScanPair, volume: np.ndarray, *, max_slices: int
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The planes of ``volume`` (HR grid) that high-frequency excess is measured on, (N, 1, H, W), and the
        plane axes along which the LR grid is coarser (``reduced_axes`` of
        :func:`shared_models.metrics.high_frequency_excess`). Default: the scored slices, coarser along both."""
        return self.scored(pair, volume, max_slices=max_slices), (-2, -1)

    def restored(
        self, model: nn.Module, pair: ScanPair, *, device: torch.device, max_slices: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's output and the truth on the scored slices: two (N, 1, H, W) tensors (default: the whole
        scan restored, then its scored slices; a pairing may compute only those)."""
        restored = self.restore(model, pair, device=device)
        return self.scored(pair, restored, max_slices=max_slices), self.scored(pair, pair.hr, max_slices=max_slices)

    def baseline(self, pair: ScanPair, *, max_slices: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The interpolation baseline and the truth on the same slices as :meth:`restored`."""
        interpolated = self.interpolate(pair)
        return self.scored(pair, interpolated, max_slices=max_slices), self.scored(pair, pair.hr, max_slices=max_slices)


@dataclass(frozen=True)
class PreparedSite:
    """A site's pairs by split, plus what could not be used.

    ``test``: the test split's pairs (may be empty: such a site still trains; nothing scores them during rounds).
    ``supervision``: the site's ``site.toml`` value. ``intensity``: how its scans were mapped to [0, 1]
    (``{"modality", "kind", "range"}``: the HU window for CT, the foreground percentiles for MR), which the site
    reports so that checkpoints can record it; no scan's own values are in it. ``profile``: the site's acquisition
    model (which made every pair's LR). ``config``: its ``site.toml`` settings. ``split_counts`` and ``test_note``:
    :meth:`client.data.site.Site.split_counts` and :meth:`~client.data.site.Site.test_note` (counts and a line
    for reports; no id).
    """

    name: str
    directory: Path
    scale: int
    pairing: Pairing
    train: tuple[ScanPair, ...]
    val: tuple[ScanPair, ...]
    test: tuple[ScanPair, ...]
    skipped: tuple[Skipped, ...]
    supervision: str
    intensity: dict
    profile: AcquisitionProfile
    config: SiteConfig
    split_counts: dict[str, dict[str, int]]
    test_note: str | None


def intensity_policy(site: Site) -> dict:
    """The site's intensity mapping rule (not any scan's values): modality, kind and range."""
    config = site.config
    if config.modality == "CT":
        return {"modality": "CT", "kind": "ct-window", "range": list(config.ct_window)}
    return {"modality": config.modality, "kind": "mr-percentile", "range": list(config.mr_percentiles)}


def site_seed(name: str, seed: int) -> int:
    """A stable per-site seed (Python's ``hash`` is salted per process, so it cannot be used)."""
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@functools.cache
def prepare_site(site_dir: str, scale: int, pairing: Pairing) -> PreparedSite:
    """Load a site folder once and make its train, validation and test pairs with ``pairing`` (cached per process,
    with no size limit: one simulation worker may serve every site in turn, and an evicted site would be read and
    degraded again every round).

    LR noise is drawn from a stream seeded by the site's name and split seed; the test pairs draw from a stream
    of their own, so train and validation pairs are the same whether or not the site has test scans.

    Raises :class:`SiteError` when the folder is missing, empty, has nothing usable, cannot give ``pairing``'s
    pairs, or lacks a train or validation scan (a test scan is optional).
    """
    site: Site = load_site(Path(site_dir))
    pairing.accepts(site)
    profile = profile_from_config(site.config.acquisition, site.config.modality)
    rng = np.random.default_rng(site_seed(site.config.name, site.config.split_seed))
    splits: dict[str, list[ScanPair]] = {"train": [], "val": []}
    for scan in site.scans:
        if scan.split in splits:
            splits[scan.split].extend(pairing.pairs(scan, profile, scale, rng, site))
    for split, pairs in splits.items():
        if not pairs:
            raise SiteError(
                site.directory,
                f"no usable scan in the {split} split",
                "add scans or change [split] in site.toml so that train and val each get at least one",
            )
    test_rng = np.random.default_rng(site_seed(site.config.name + ":test", site.config.split_seed))
    test = [pair for scan in site.split("test") for pair in pairing.pairs(scan, profile, scale, test_rng, site)]
    for item in site.skipped:
        log.warning("site %s: skipped %s: %s", site.config.name, item.path, item.reason)
    log.info(
        "site %s (%s): %d train, %d val and %d test pairs, %d files skipped (torch threads: %d)",
        site.config.name, type(pairing).__name__, len(splits["train"]), len(splits["val"]), len(test),
        len(site.skipped), torch.get_num_threads(),
    )
    return PreparedSite(
        name=site.config.name,
        directory=site.directory,
        scale=scale,
        pairing=pairing,
        train=tuple(splits["train"]),
        val=tuple(splits["val"]),
        test=tuple(test),
        skipped=tuple(site.skipped),
        supervision=site.config.supervision,
        intensity=intensity_policy(site),
        profile=profile,
        config=site.config,
        split_counts=site.split_counts(),
        test_note=site.test_note(),
    )
