"""Checkpoints of the global model in the run folder (atomic: readers never see half a file)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord
from torch import nn

from shared_models.checkpoint import save_checkpoint

LAST = "checkpoint.pt"
FINAL = "final_model.pt"


def write_global(run_dir: Path, model: nn.Module, arrays: ArrayRecord, *, scale: int, name: str, round_: int) -> Path:
    """Load ``arrays`` into ``model`` and save it as ``run_dir/name`` with the round in its metadata."""
    model.load_state_dict(arrays.to_torch_state_dict())
    return save_checkpoint(run_dir / name, model, scale=scale, extra={"round": round_})
