"""Fixed (parameter-free) interpolation used as the SR baseline and as the networks' global skip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MODES = {4: "bicubic", 5: "trilinear"}


def upsample_baseline(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Interpolate a low-resolution batch by an integer factor along every spatial axis.

    Args:
        lr: (B, C, H, W) for 2D (bicubic) or (B, C, D, H, W) for 3D (trilinear), intensities in [0, 1].
        scale: integer upsampling factor >= 1.

    Returns:
        (B, C, sH, sW) or (B, C, sD, sH, sW), clamped to [0, 1] (bicubic overshoots at edges).
        ``align_corners=False``: pixel centres, the convention of the degradation models.
    """
    if lr.ndim not in _MODES:
        raise ValueError(f"expected a (B, C, H, W) or (B, C, D, H, W) tensor, got shape {tuple(lr.shape)}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    up = F.interpolate(lr, scale_factor=int(scale), mode=_MODES[lr.ndim], align_corners=False)
    return up.clamp(0.0, 1.0)
