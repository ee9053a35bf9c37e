"""A site's own persistent state on disk (what must outlive one Flower run or one ClientApp process).

Flower's ``context.state`` lives only as long as the run; whatever a site keeps across runs or rounds on its
own (a GAN's local discriminator, FedBN layers, the privacy ledger) goes to the site's state folder, written
atomically: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from shared_models.atomic import atomic_write
from shared_models.errors import ExplainedError

#: Name of the state folder inside the site folder when the node config names none (hidden: the site
#: loader skips hidden folders, so state files are never mistaken for scans).
DEFAULT_STATE_DIR_NAME = ".fedsr-state"
#: Node-config key of an explicit state folder (``--node-config "state-dir='/var/lib/fedsr'"``).
STATE_DIR_KEY = "state-dir"

_PLAIN_LEAVES = (bool, int, float, str, type(None))


class StateError(ExplainedError, RuntimeError):
    """A state file or folder that cannot be used; the message names the path, the problem and what to do."""


#: What to do when the state folder cannot be used.
_STATE_DIR_HINT = f"give the SuperNode a writable one with --node-config \"{STATE_DIR_KEY}='/path/to/state'\""


def site_state_dir(node_config: Mapping[str, Any], site_dir: Path | str) -> Path:
    """The site's own state folder, created if missing.

    The node config's ``state-dir`` when given (``~`` expanded), else ``<site_dir>/.fedsr-state``.

    Raises:
        StateError: the folder cannot be created or written (e.g. a read-only scan mount); the message says to
            set ``state-dir``.
    """
    configured = node_config.get(STATE_DIR_KEY)
    folder = Path(str(configured)).expanduser() if configured else Path(site_dir) / DEFAULT_STATE_DIR_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StateError(
            folder, f"cannot create the site's state folder ({err.strerror or err})", _STATE_DIR_HINT
        ) from err
    if not os.access(folder, os.W_OK):
        raise StateError(folder, "the site's state folder is not writable", _STATE_DIR_HINT)
    return folder


def _check_storable(value: Any, where: str) -> None:
    """Only what ``torch.load(weights_only=True)`` reads back: tensors, plain values, dict/list/tuple of them."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: keys must be str or int, got {key!r}")
            _check_storable(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_storable(item, f"{where}[{i}]")
    elif not isinstance(value, (torch.Tensor, *_PLAIN_LEAVES)):
        raise TypeError(f"{where}: only tensors and plain values can be stored, got {type(value).__name__}")


def save_state_atomic(path: Path | str, tensors: Mapping[str, Any]) -> Path:
    """Write ``tensors`` (a dict of tensors; nested dicts/lists of tensors and plain values are allowed, e.g. an
    optimiser's ``state_dict()``) to ``path`` atomically.

    Tensors are stored as detached CPU copies. The data goes to a temporary file in the same folder, which is
    flushed and fsynced, then renamed over ``path`` (and the rename made durable); on any error the temporary
    file is removed and ``path`` is left as it was. Parent folders are created. Returns ``path``.
    """
    path = Path(path)
    _check_storable(dict(tensors), path.name)
    payload = _to_cpu(dict(tensors))
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_state(path: Path | str) -> dict | None:
    """What :func:`save_state_atomic` wrote (on the CPU), or None when there is no such file.

    Raises:
        StateError: the file exists but cannot be read (corrupt, or not a state file). This is never silently
            treated as "no state": for a privacy ledger that would reset the budget already spent.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the weights-only unpickler raises assorted types on garbage
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        raise StateError(
            path,
            f"state file cannot be read, truncated or corrupt ({reason})",
            "restore it from a backup, or remove it to start afresh (what it recorded is then lost)",
        ) from err
    if not isinstance(payload, dict):
        raise StateError(
            path,
            f"not a fedsr state file (holds {type(payload).__name__}, not a dict)",
            "move it out of the site's state folder",
        )
    return payload


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value
