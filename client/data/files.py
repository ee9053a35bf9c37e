"""Which files of a site folder are candidate scans."""

from __future__ import annotations

import os
from pathlib import Path

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
