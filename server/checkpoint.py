"""Checkpoints of the global model in the run folder (atomic: readers never see half a file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from torch import nn

from server.settings import RunSettings
from shared_models.checkpoint import save_checkpoint
from shared_models.registry import family_of
from shared_models.settings import FamilyOptions

LAST = "checkpoint.pt"
FINAL = "final_model.pt"


def load_global(model: nn.Module, arrays: ArrayRecord, options: FamilyOptions | None) -> nn.Module:
    """Load the global weights into ``model``: exactly the keys its family sends between sites and coordinator
    with these ``options``. Weights a family keeps at the sites (e.g. a discriminator that never travels) keep
    their initial values here."""
    expected = set(family_of(model).shared_state(model, options))
    state = arrays.to_torch_state_dict()
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"global weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)  # shapes are still checked
    return model


def write_global(
    run_dir: Path,
    model: nn.Module,
    arrays: ArrayRecord,
    *,
    settings: RunSettings,
    normalisation: dict[str, Any],
    name: str,
    round_: int,
    export: bool | None = None,
) -> Path:
    """Save the global weights as ``run_dir/name`` with the round in its metadata.

    ``normalisation``: how the sites mapped their scans to [0, 1] (``{site: {"modality", "kind", "range"}}``, as
    they reported it), so that the model can be applied to a new scan, and its output mapped back, the same way.
    The round checkpoint holds the whole model (for resuming); a finished model (``export``, default: the name is
    :data:`FINAL`) is what the family exports (e.g. a generator alone when a discriminator trained beside it: what is
    evaluated and applied).
    """
    load_global(model, arrays, settings.family_options)
    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
    to_save = family_of(model).export(model) if (name == FINAL if export is None else export) else model
    return save_checkpoint(
        run_dir / name, to_save, scale=settings.scale, normalisation=normalisation, extra={"round": round_}
    )
