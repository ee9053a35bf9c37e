"""A site's scans turned into aligned high/low-resolution pairs, prepared once per process.

The low-resolution image of every scan is synthesised with the site's *own* acquisition model
(``site.toml`` -> :mod:`client.degrade`), so each hospital's data carries its scanner's blur and noise.
Loading and degrading happen once per (site folder, scale) and are cached for the life of the process:
Flower calls the ClientApp every round, and re-reading scans each round would dominate the round time.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.data.errors import SiteError
from client.data.site import Site, Skipped, load_site
from client.degrade import degrade_inplane, degrade_isotropic, profile_from_config

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ScanPair:
    """One scan as a training/evaluation pair.

    ``hr``: float32 (X, Y, Z) in [0, 1], cropped so the scaled axes are multiples of the scale.
    ``lr``: the same anatomy as the site's scanner would acquire it: float32 (X / scale, Y / scale, Z) for
    in-plane SR, (X / scale, Y / scale, Z / scale) for 3D SR.
    Compared and hashed by identity (a pair is prepared once per process), so results can be cached per pair.
    """

    subject: str
    hr: np.ndarray
    lr: np.ndarray


@dataclass(frozen=True)
class PreparedSite:
    """A site's pairs by split, plus what could not be used."""

    name: str
    directory: Path
    scale: int
    train: tuple[ScanPair, ...]
    val: tuple[ScanPair, ...]
    skipped: tuple[Skipped, ...]
    geometry: str = "in-plane"


def site_seed(name: str, seed: int) -> int:
    """A stable per-site seed (Python's ``hash`` is salted per process, so it cannot be used)."""
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def require_train_and_val(site: Site, splits: dict[str, list]) -> None:
    """Raise :class:`SiteError` naming the site when its train or val split ended up empty."""
    for split, pairs in splits.items():
        if not pairs:
            raise SiteError(
                site.directory,
                f"no usable scan in the {split} split",
                "add scans or change [split] in site.toml so that train and val each get at least one",
            )


#: How LR is made from HR for each kind of model: 2D models restore in-plane, 3D models every axis.
DEGRADERS = {"in-plane": degrade_inplane, "isotropic": degrade_isotropic}


@functools.lru_cache(maxsize=8)
def prepare_site(site_dir: str, scale: int, geometry: str = "in-plane") -> PreparedSite:
    """Load a site folder once and synthesise its LR images (cached per process).

    ``geometry``: "in-plane" (2D models) or "isotropic" (3D models), see :data:`DEGRADERS`.

    Raises :class:`SiteError` when the folder is missing, empty, has nothing usable, or lacks a train or
    validation scan.
    """
    site: Site = load_site(Path(site_dir))
    if site.config.supervision != "paired":
        raise SiteError(
            site.directory,
            f"site.toml says supervision = {site.config.supervision!r}: its scans are not high-resolution targets",
            "train a self-supervised model on it (--model smore), or remove it from this federation",
        )
    profile = profile_from_config(site.config.acquisition, site.config.modality)
    rng = np.random.default_rng(site_seed(site.config.name, site.config.split_seed))
    splits: dict[str, list[ScanPair]] = {"train": [], "val": []}
    for scan in site.scans:
        if scan.split not in splits:
            continue
        hr, lr = DEGRADERS[geometry](scan.image, profile, scale, scan.volume.spacing, rng)
        splits[scan.split].append(ScanPair(scan.volume.subject, hr, lr))
    require_train_and_val(site, splits)
    for item in site.skipped:
        log.warning("site %s: skipped %s: %s", site.config.name, item.path, item.reason)
    log.info(
        "site %s: %d train and %d val scans, %d files skipped (torch threads: %d)",
        site.config.name, len(splits["train"]), len(splits["val"]), len(site.skipped), torch.get_num_threads(),
    )
    return PreparedSite(
        name=site.config.name,
        directory=site.directory,
        scale=scale,
        geometry=geometry,
        train=tuple(splits["train"]),
        val=tuple(splits["val"]),
        skipped=tuple(site.skipped),
    )
