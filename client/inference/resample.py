"""The interpolation of a scan onto the SR output's grid, a slab of output slices at a time: what the preview
shows beside the SR, and what tells how far beyond the model's intensity range a saturated voxel lies.

Cubic along every restored axis (``F.interpolate``'s bicubic, Keys a = -0.75, ``align_corners=False``): in-plane
as the 2D models' baseline (:func:`shared_models.resample.upsample_baseline`), along Z as the through-plane one
(bicubic with a factor of 1 on the other axis samples it exactly at its own pixels). The output comes slab by slab,
so each slab is interpolated from the input slices it needs plus :data:`MARGIN` on each side: with integer factors
the slab's grid lines up with the whole volume's, and the result equals interpolating the whole volume, which
would hold the full output grid in memory.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Input slices beyond a slab's own on each side: the cubic kernel's reach.
MARGIN = 2


def interpolate_slab(
    volume: np.ndarray, shape: tuple[int, int, int], z0: int, n: int, value_range: tuple[float, float]
) -> np.ndarray:
    """Output slices ``z0 .. z0 + n - 1`` of ``volume`` (X, Y, Z) interpolated onto an (X', Y', Z') = ``shape``
    grid over the same field of view (Z' a multiple of Z). Returns float32 (X', Y', n), clipped to
    ``value_range`` (cubic overshoots)."""
    depth = volume.shape[2]
    factor = shape[2] // depth
    if factor * depth != shape[2]:
        raise ValueError(f"{shape[2]} output slices are not a multiple of the {depth} input slices")
    lo, hi = max(0, z0 // factor - MARGIN), min(depth, -(-(z0 + n) // factor) + MARGIN)
    planes = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume[:, :, lo:hi], 2, 0)[:, None], dtype=np.float32))
    if tuple(planes.shape[2:]) != tuple(shape[:2]):
        planes = F.interpolate(planes, size=tuple(shape[:2]), mode="bicubic", align_corners=False)
    slab = planes[:, 0].permute(1, 2, 0)  # (X', Y', slices lo..hi)
    if factor > 1:
        slab = F.interpolate(slab[:, None], scale_factor=(1.0, float(factor)), mode="bicubic",
                             align_corners=False)[:, 0]
    start = z0 - lo * factor
    return np.clip(slab[:, :, start : start + n].numpy(), *value_range)
