"""Checkpoints of the global model in the run folder (atomic: readers never see half a file)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord
from torch import nn

from shared_models.checkpoint import save_checkpoint
from shared_models.gan import DISCRIMINATOR_PREFIX, export_generator
from shared_models.registry import model_spec

LAST = "checkpoint.pt"
FINAL = "final_model.pt"


def load_global(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    """Load the global weights into ``model``.

    Every key must be there, except a GAN discriminator's when it stays at the sites (``gan-discriminator
    = local``): the coordinator never has it, and the checkpoint keeps the discriminator's initial weights.
    """
    result = model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(DISCRIMINATOR_PREFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(f"global weights do not fit the model: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    return model


def exported(model: nn.Module) -> nn.Module:
    """What a run delivers: the model itself, or a GAN's generator alone (what is evaluated and applied)."""
    return export_generator(model) if model_spec(model)["name"] == "gan" else model


def write_global(run_dir: Path, model: nn.Module, arrays: ArrayRecord, *, scale: int, name: str, round_: int) -> Path:
    """Save the global weights as ``run_dir/name`` with the round in its metadata.

    The round checkpoint holds the whole model (a GAN with its discriminator, for resuming); the final model is
    :func:`exported`.
    """
    load_global(model, arrays)
    to_save = exported(model) if name == FINAL else model
    return save_checkpoint(run_dir / name, to_save, scale=scale, extra={"round": round_})
