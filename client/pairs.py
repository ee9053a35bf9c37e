"""A site's scans turned into aligned high/low-resolution pairs, prepared once per process.

The low-resolution image of every scan is synthesised with the site's *own* acquisition model
(``site.toml`` -> :mod:`client.degrade`), so each hospital's data carries its scanner's blur and noise. How a scan
becomes pairs, how pairs are sampled for training, how a model restores a whole scan, how the scan is scored beside
an interpolation baseline and how an output is acquired again (the forward model) is a :class:`Pairing` (in-plane
and isotropic pairs in :mod:`client.paired`, one-axis pairs in :mod:`client.selfsup`); a family's local task picks
one. Loading and degrading happen when a message for the site arrives, once per (site folder, scale, pairing),
and the result is cached (:class:`PreparedSites`): Flower calls the ClientApp every round, and re-reading scans each
round would dominate the round time. The cache is bounded by the bytes of its arrays (the node config's
``data-cache-mb``, else a quarter of the machine's memory), so one simulation worker that serves many sites in turn
keeps the most recently used ones only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays its pairs hold (voxels and geometry of every split; an array two pairs share is
        counted once): what keeping the site prepared costs in memory."""
        arrays = {id(value): value for pair in (*self.train, *self.val, *self.test)
                  for value in vars(pair).values() if isinstance(value, np.ndarray)}
        return sum(array.nbytes for array in arrays.values())


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


#: Node-config key: the most memory (MiB) one process keeps in prepared sites (``--node-config "data-cache-mb=4096"``).
DATA_CACHE_KEY = "data-cache-mb"


def default_cache_bytes() -> int:
    """A quarter of the machine's physical memory: a simulation worker keeps some 20 phantom sites of the tiny
    benchmark on a 24 GiB machine, and leaves the rest to training, the coordinator and the other workers."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class PreparedSites:
    """Prepared sites by (site folder, scale, pairing), least recently used first out: when their arrays
    (:attr:`PreparedSite.nbytes`) together pass ``limit_bytes``, the least recently used sites are let go, and
    prepared again from their folders (the same pairs: their noise is seeded) when a message for them comes. The
    site just prepared or used is kept even when it alone passes the limit (it is needed now)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._sites: OrderedDict[tuple[str, int, Pairing], PreparedSite] = OrderedDict()
        self._lock = threading.Lock()  # for messages handled on several threads; preparing runs outside it

    def get(self, site_dir: str, scale: int, pairing: Pairing) -> PreparedSite:
        """The site prepared with ``pairing`` (:func:`load_prepared_site` on a miss), now the most recently used."""
        key = (site_dir, scale, pairing)
        with self._lock:
            if key in self._sites:
                self._sites.move_to_end(key)
                return self._sites[key]
        site = load_prepared_site(site_dir, scale, pairing)
        with self._lock:
            self._sites[key] = site
            self._sites.move_to_end(key)
            self._evict()
        return site

    def set_limit(self, limit_bytes: int) -> None:
        """A new limit, applied at once."""
        with self._lock:
            self.limit_bytes = limit_bytes
            self._evict()

    def held(self) -> list[tuple[str, int, Pairing]]:
        """The keys of the sites kept, least recently used first."""
        with self._lock:
            return list(self._sites)

    @property
    def total_bytes(self) -> int:
        """Bytes of the arrays of every site kept."""
        with self._lock:
            return sum(site.nbytes for site in self._sites.values())

    def clear(self) -> None:
        """Let every site go."""
        with self._lock:
            self._sites.clear()

    def _evict(self) -> None:
        sizes = {key: site.nbytes for key, site in self._sites.items()}
        while len(self._sites) > 1 and sum(sizes.values()) > self.limit_bytes:
            key, site = self._sites.popitem(last=False)
            log.info("site %s: its prepared data (%.1f MB) let go to stay under %s %.0f; prepared again when used",
                     site.name, sizes.pop(key) / 2**20, DATA_CACHE_KEY, self.limit_bytes / 2**20)


#: The process's prepared sites (:func:`prepare_site`).
PREPARED_SITES = PreparedSites(default_cache_bytes())


def set_data_cache_limit(node_config: Mapping[str, Any]) -> None:
    """Bound :data:`PREPARED_SITES` by the node config's ``data-cache-mb`` (MiB), else by
    :func:`default_cache_bytes`. Raises ValueError naming the key when it is not a number > 0."""
    value = node_config.get(DATA_CACHE_KEY)
    if value is None:
        PREPARED_SITES.set_limit(default_cache_bytes())
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(
            f"node config {DATA_CACHE_KEY!r} must be a number of megabytes > 0, got {value!r}: start the SuperNode "
            f"with --node-config \"{DATA_CACHE_KEY}=4096\" (or leave it out for a quarter of the machine's memory)"
        )
    PREPARED_SITES.set_limit(int(value * 2**20))


def prepare_site(site_dir: str, scale: int, pairing: Pairing) -> PreparedSite:
    """The site folder's pairs made with ``pairing``: from :data:`PREPARED_SITES`, prepared when not kept there."""
    return PREPARED_SITES.get(site_dir, scale, pairing)


def load_prepared_site(site_dir: str, scale: int, pairing: Pairing) -> PreparedSite:
    """Load a site folder and make its train, validation and test pairs with ``pairing`` (uncached: use
    :func:`prepare_site`).

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
