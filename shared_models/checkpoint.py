"""Self-describing model checkpoints: weights + architecture + scale + normalisation, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared_models.atomic import atomic_write
from shared_models.errors import ExplainedError
from shared_models.registry import build_model, model_spec, unwrap

FORMAT = "fedsr-checkpoint"
FORMAT_VERSION = 1
_PLAIN_LEAVES = (bool, int, float, str, type(None))


class CheckpointError(ExplainedError, ValueError):
    """A file that is not a readable fedsr checkpoint; the message names the file and what to do."""


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back (or that would pickle code)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be str, got {key!r}")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN_LEAVES):
        raise TypeError(
            f"{where}: only dict/list/tuple/str/int/float/bool/None can be stored, got {type(value).__name__}"
        )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    scale: int,
    normalisation: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (built by ``build_model``; Opacus/DDP wrappers are unwrapped) to ``path`` atomically.

    Stored: format tag and version, model name + resolved hyperparameters (``model_spec``), the state_dict as
    CPU tensors, ``scale`` (the SR factor), ``normalisation`` (e.g. ``Normalisation.to_dict()``) and ``extra``
    (round, metrics, ...; plain values only). The file is written to a temporary file in the same directory,
    flushed and fsynced, then renamed over ``path``, so readers see the old or the new file, never half of one.
    Parent directories are created. Returns the path written.
    """
    path = Path(path)
    model = unwrap(model)
    spec = model_spec(model)
    model_scale = spec["params"].get("scale")
    if model_scale is not None and model_scale != scale:
        raise ValueError(f"scale={scale} contradicts the model's own scale {model_scale}")
    _check_plain(normalisation, "normalisation")
    _check_plain(extra, "extra")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": spec,
        "scale": int(scale),
        "normalisation": normalisation,
        "extra": extra or {},
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
    }
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored by :func:`save_checkpoint` from the file alone.

    Returns:
        (model in eval mode, meta) where meta = {"format", "version", "model": {"name", "params"}, "scale",
        "normalisation", "extra"}.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated/corrupt file, not a fedsr checkpoint, newer format, or weights that do not
            fit the stored architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file there")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the weights-only unpickler raises assorted types (KeyError, EOFError...) on garbage
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        raise CheckpointError(
            path,
            f"cannot be read as a checkpoint, truncated or corrupt ({reason})",
            "copy it again or use an earlier one",
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            path, "not a fedsr checkpoint", "save models with shared_models.checkpoint.save_checkpoint"
        )
    if payload.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            path, f"checkpoint format version {payload['version']} is newer than {FORMAT_VERSION}", "upgrade fedsr"
        )
    spec = payload["model"]
    try:
        model = build_model(spec["name"], **spec["params"])
        model.load_state_dict(payload["state_dict"])
    except (ValueError, TypeError, RuntimeError, KeyError) as err:
        raise CheckpointError(
            path,
            f"stored weights do not fit the stored model ({err})",
            "the file is damaged: copy it again or use an earlier one",
        ) from err
    model.to(map_location).eval()
    meta = {key: value for key, value in payload.items() if key != "state_dict"}
    return model, meta
