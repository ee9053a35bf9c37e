"""Applying a trained SR model to a whole scan."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def super_resolve(
    model: nn.Module,
    lr_volume: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    slices: np.ndarray | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Super-resolve a volume in-plane, slice by slice, with a 2D model.

    ``lr_volume``: float32 (X, Y, Z) in [0, 1]. ``slices``: indices along Z to process (default: all).
    Returns float32 (s*X, s*Y, len(slices)) clamped to [0, 1]; the model stays in eval mode afterwards.
    """
    model.eval().to(device)
    index = np.arange(lr_volume.shape[2]) if slices is None else np.asarray(slices)
    outputs = []
    for start in range(0, len(index), batch_size):
        chunk = np.moveaxis(lr_volume[:, :, index[start : start + batch_size]], 2, 0)[:, None]
        batch = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
        outputs.append(model(batch).clamp_(0.0, 1.0)[:, 0].cpu())
    return np.moveaxis(torch.cat(outputs).numpy(), 0, 2)
