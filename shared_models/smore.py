"""SMORE-style one-axis super-resolution (Zhao et al., "SMORE: a self-supervised anti-aliasing and
super-resolution algorithm for MRI using deep learning", IEEE TMI 2021), and its through-plane application.

A 2D network restores resolution along ONE axis, the last: (B, 1, H, W) -> (B, 1, H, scale*W). Trained on 2D
patches whose last axis was degraded with a scanner's slice profile (from thin-slice volumes at a paired site, or
from a thick-slice site's own high-resolution in-plane slices), it is applied through-plane: every plane of a
thick-slice volume that contains the slice axis Z, oriented so that Z is last, in both orthogonal orientations,
averaged.

Grid convention (as :mod:`client.degrade` and :func:`shared_models.resample.upsample_baseline`,
``align_corners=False``): LR sample ``i`` along the restored axis sits at HR coordinate ``i * scale + (scale - 1) / 2``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared_models.edsr import ResidualBlock
from shared_models.precision import exact_float32
from shared_models.registry import register_model

__all__ = [
    "SMORE",
    "SMORE_PRESETS",
    "AxisPixelShuffle",
    "axis_pixel_shuffle",
    "interpolate_last_axis",
    "interpolate_through_plane",
    "super_resolve_planes",
    "super_resolve_through_plane",
]

SMORE_PRESETS = {
    "tiny": {"n_blocks": 4, "width": 32},
    "small": {"n_blocks": 8, "width": 48},
    "base": {"n_blocks": 16, "width": 64},
}


def interpolate_last_axis(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Cubic interpolation by an integer factor along the last axis only: (B, C, H, W) -> (B, C, H, scale*W).

    ``F.interpolate(mode="bicubic")`` with factor 1 on H samples H exactly at its own pixel centres (the cubic
    kernel's weights there are 0, 1, 0, 0), so H is untouched and W gets 1D cubic (Keys, a = -0.75) interpolation.
    ``align_corners=False`` (pixel centres, the degradation models' convention); clamped to [0, 1] like
    :func:`shared_models.resample.upsample_baseline` (cubic overshoots at edges).
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    up = F.interpolate(x, scale_factor=(1.0, float(scale)), mode="bicubic", align_corners=False)
    return up.clamp(0.0, 1.0)


def axis_pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Sub-pixel rearrangement along the last axis only: (B, C*s, H, W) -> (B, C, H, s*W).

    ``out[b, c, h, w*s + i] = x[b, c*s + i, h, w]`` (the channel order of ``torch.nn.PixelShuffle``, restricted
    to one axis).
    """
    b, channels, h, w = x.shape
    if channels % scale:
        raise ValueError(f"{channels} channels cannot be shuffled by {scale} along one axis")
    return x.view(b, channels // scale, scale, h, w).permute(0, 1, 3, 4, 2).reshape(b, channels // scale, h, w * scale)


class AxisPixelShuffle(nn.Module):
    """:func:`axis_pixel_shuffle` as a module (no parameters)."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return axis_pixel_shuffle(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, axis=-1"


class AxisSubpixelUpsample(nn.Module):
    """3x3 conv to ``width * scale`` channels, then :class:`AxisPixelShuffle`: upsamples the last axis only.

    MONAI's ``SubpixelUpsample`` (and ``torch.nn.PixelShuffle``) cannot be used: they take one integer factor for
    every spatial axis, so the conv makes ``width * scale**2`` channels and both H and W grow; a one-axis SR
    network must leave H alone. The conv starts ICNR-initialised (Aitken et al., 2017) as MONAI's does: the
    ``scale`` sub-pixel kernels of each output channel are equal, so the untrained upsampler is a conv followed by
    nearest-neighbour repetition along W (no checkerboard).
    """

    def __init__(self, width: int, scale: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width * scale, kernel_size=3, padding=1)
        self.shuffle = AxisPixelShuffle(scale)
        with torch.no_grad():
            base = nn.Conv2d(width, width, kernel_size=3, padding=1)
            self.conv.weight.copy_(base.weight.repeat_interleave(scale, dim=0))
            self.conv.bias.copy_(base.bias.repeat_interleave(scale, dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, width, H, W) -> (B, width, H, scale*W)."""
        return self.shuffle(self.conv(x))


def _apply(model: nn.Module, volume: np.ndarray, *, device: torch.device | str, batch_size: int) -> np.ndarray:
    """Whole-volume inference of the family: restore the slice axis (see :func:`super_resolve_through_plane`)."""
    return super_resolve_through_plane(model, volume, device=device, batch_size=batch_size)


@register_model("smore", presets=SMORE_PRESETS, task="client.tasks.smore:SmoreTask", apply=_apply,
                head=("upsample", "tail"), conditioned="body")
class SMORE(nn.Module):
    """EDSR-like network that restores the last axis: (B, 1, H, W) -> (B, 1, H, scale*W).

    Its reconstruction head (``personal = "head"``) is the one-axis upsampler and the output conv;
    ``condition = "acquisition"`` modulates the body's output before the long skip.

    head conv -> ``n_blocks`` residual blocks (``shared_models.edsr.ResidualBlock``, no normalisation: DP-SGD
    friendly) -> body conv + long skip -> one-axis sub-pixel upsampler (one stage of ``scale``) -> output conv.
    With ``global_residual`` the network predicts a correction to :func:`interpolate_last_axis` of its input and
    its last conv starts at zero, so the untrained model returns exactly that interpolation.
    Input intensities in [0, 1]; the output is not clamped.
    """

    spatial_dims = 2
    in_channels = 1

    def __init__(
        self,
        scale: int = 2,
        width: int = 64,
        n_blocks: int = 16,
        res_scale: float = 1.0,
        global_residual: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
            raise ValueError(f"scale must be an integer >= 2, got {scale!r}")
        if n_blocks < 0 or width < 1:
            raise ValueError(f"need n_blocks >= 0 and width >= 1; got {n_blocks}, {width}")
        self.scale = scale
        self.global_residual = global_residual
        self.head = nn.Conv2d(1, width, kernel_size=3, padding=1)
        self.body = nn.Sequential(
            *(ResidualBlock(2, width, res_scale) for _ in range(n_blocks)),
            nn.Conv2d(width, width, kernel_size=3, padding=1),
        )
        self.upsample = AxisSubpixelUpsample(width, scale)
        self.tail = nn.Conv2d(width, 1, kernel_size=3, padding=1)
        if global_residual:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, 1, H, scale*W)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"SMORE expects (B, 1, H, W) with W the axis to restore, got shape {tuple(x.shape)}")
        features = self.head(x)
        features = features + self.body(features)
        out = self.tail(self.upsample(features))
        if self.global_residual:
            out = out + interpolate_last_axis(x, self.scale)
        return out


# --------------------------------------------------------------------------------------------- through-plane


def _check_volume(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {volume.shape}")
    return volume


@torch.no_grad()
def super_resolve_planes(
    model: nn.Module,
    planes: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    clamp: bool = True,
) -> np.ndarray:
    """Apply a one-axis model to a stack of 2D planes: float32 (N, H, W) -> (N, H, scale*W).

    The last axis is the one restored; clamped to [0, 1] unless ``clamp=False``. The model is left in eval mode
    on ``device``.
    """
    planes = np.asarray(planes, dtype=np.float32)
    if planes.ndim != 3:
        raise ValueError(f"expected a stack of planes (N, H, W), got shape {planes.shape}")
    model.eval().to(device)
    outputs = []
    for start in range(0, planes.shape[0], batch_size):
        chunk = np.ascontiguousarray(planes[start : start + batch_size, None])
        with exact_float32():  # as every inference path (shared_models/inference.py)
            out = model(torch.from_numpy(chunk).to(device))[:, 0].float()
        outputs.append((out.clamp_(0.0, 1.0) if clamp else out).cpu())
    return torch.cat(outputs).numpy()


def super_resolve_through_plane(
    model: nn.Module,
    volume: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Restore the slice axis of a thick-slice volume with a one-axis (SMORE) model.

    ``volume``: float32 (X, Y, Z') in [0, 1], Z' the thick-slice axis. The model is applied to every (Y, Z') plane
    (one per x) and every (X, Z') plane (one per y), each with Z last, and the two (X, Y, scale*Z') estimates are
    averaged (SMORE's orthogonal fusion; it also cancels much of each orientation's own artefacts).
    Returns float32 (X, Y, scale*Z') clamped to [0, 1]; the model is left in eval mode on ``device``.
    """
    volume = _check_volume(volume)
    # planes (Y, Z') for each x -> (X, Y, sZ'); planes (X, Z') for each y -> (Y, X, sZ')
    sagittal = super_resolve_planes(model, volume, device=device, batch_size=batch_size, clamp=False)
    coronal = super_resolve_planes(model, volume.transpose(1, 0, 2), device=device, batch_size=batch_size, clamp=False)
    out = 0.5 * (sagittal + coronal.transpose(1, 0, 2))
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def interpolate_through_plane(volume: np.ndarray, scale: int) -> np.ndarray:
    """The interpolation baseline through-plane: :func:`interpolate_last_axis` along Z (what the untrained model's
    global residual gives). float32 (X, Y, Z') -> (X, Y, scale*Z') clamped to [0, 1]."""
    volume = _check_volume(volume)
    batch = torch.from_numpy(np.ascontiguousarray(volume[:, None]))
    return interpolate_last_axis(batch, scale)[:, 0].numpy()
