"""Which files of a site folder are candidate scans, and which sub-folders of a sites folder are sites."""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

from client.data.errors import SitesFolderError

SITE_CONFIG_NAME = "site.toml"


def is_ignored(name: str) -> bool:
    """Names skipped silently: hidden files and folders, ``site.toml`` and ``README*``."""
    return name.startswith(".") or name == SITE_CONFIG_NAME or name.upper().startswith("README")


def list_scan_files(folder: Path) -> list[Path]:
    """Every non-ignored file under ``folder`` (recursive, symlinked folders not followed), sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_ignored(d)]
        found.extend(Path(root) / name for name in files if not is_ignored(name))
    return sorted(found)


def site_folders(sites_dir: str | PathLike[str]) -> list[str]:
    """The site folders of a federation: the sub-folders of ``sites_dir`` (``~`` expanded), sorted by name.

    Hidden sub-folders (``.name``) and plain files are skipped. This one list numbers the sites everywhere
    (simulated node ``i`` is the ``i``-th folder), so the simulator and ``flwr run`` agree.

    Raises:
        SitesFolderError: (a ``FileNotFoundError``) ``sites_dir`` does not exist, is not a folder, or holds no
            site folder; the message names the folder and what to do.
    """
    root = Path(sites_dir).expanduser()
    hint = "give a folder with one sub-folder per site (fedsr sites make-phantoms DIR writes phantom sites)"
    if not root.exists():
        raise SitesFolderError(root, "sites folder does not exist", hint)
    if not root.is_dir():
        raise SitesFolderError(root, "is a file, not a sites folder", hint)
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not folders:
        raise SitesFolderError(root, "sites folder holds no site sub-folder (hidden folders are skipped)", hint)
    return [str(p) for p in folders]
