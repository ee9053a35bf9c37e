"""EDSR-style residual super-resolution network (Lim et al., 2017, "Enhanced Deep Residual Networks"), 2D or 3D."""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import SubpixelUpsample
from monai.networks.layers import Conv
from torch import nn

from shared_models.registry import register_model
from shared_models.resample import upsample_baseline

EDSR_PRESETS = {
    "tiny": {"n_blocks": 4, "width": 32},
    "small": {"n_blocks": 8, "width": 48},
    "base": {"n_blocks": 16, "width": 64},  # the published EDSR baseline (res_scale 1)
}


def _conv(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """3x3 (x3) convolution with "same" padding."""
    return Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=3, padding=1)


class ResidualBlock(nn.Module):
    """conv-ReLU-conv with a scaled identity skip; no normalisation layers (DP-SGD friendly)."""

    def __init__(self, spatial_dims: int, width: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(spatial_dims, width, width), nn.ReLU(), _conv(spatial_dims, width, width)
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, width, *spatial) -> same shape."""
        return x + self.res_scale * self.body(x)


def _upsampler(spatial_dims: int, width: int, scale: int) -> nn.Sequential:
    """Sub-pixel upsampling as in EDSR: x2 stages for powers of two, one x3 stage for 3.

    MONAI's optional pad-and-average-pool step (Aitken et al.) is off: it zero-pads one side, which biases the
    border, and EDSR has no such step; MONAI's ICNR initialisation already starts the shuffle checkerboard-free.
    """
    if scale == 3:
        factors = [3]
    elif scale >= 2 and scale & (scale - 1) == 0:
        factors = [2] * int(math.log2(scale))
    else:
        raise ValueError(f"scale must be 3 or a power of two >= 2, got {scale}")
    return nn.Sequential(
        *(SubpixelUpsample(spatial_dims, width, width, scale_factor=f, apply_pad_pool=False) for f in factors)
    )


@register_model("edsr", presets=EDSR_PRESETS, head=("upsample", "tail"), conditioned="body")
class EDSR(nn.Module):
    """head conv -> n_blocks residual blocks -> body conv + long skip -> sub-pixel upsampling -> output conv.

    Its reconstruction head (what a site keeps with ``personal = "head"``) is the upsampling and the output conv;
    ``condition = "acquisition"`` modulates the body's output before the long skip.

    With ``global_residual`` the network predicts a correction to the bicubic (2D) / trilinear (3D) upsampled
    input, and its last conv starts at zero, so the untrained model returns exactly that interpolation.

    Input (B, in_channels, H, W) [or (B, in_channels, D, H, W) for ``spatial_dims=3``], intensities in [0, 1];
    output (B, in_channels, scale*H, scale*W) [scale on every spatial axis], not clamped.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        n_blocks: int = 16,
        width: int = 64,
        res_scale: float = 1.0,
        scale: int = 2,
        global_residual: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 1 or n_blocks < 0 or width < 1:
            raise ValueError(
                f"need in_channels >= 1, n_blocks >= 0, width >= 1; got {in_channels}, {n_blocks}, {width}"
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.scale = scale
        self.global_residual = global_residual

        self.head = _conv(spatial_dims, in_channels, width)
        self.body = nn.Sequential(
            *(ResidualBlock(spatial_dims, width, res_scale) for _ in range(n_blocks)),
            _conv(spatial_dims, width, width),
        )
        self.upsample = _upsampler(spatial_dims, width, scale)
        self.tail = _conv(spatial_dims, width, in_channels)
        if global_residual:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) in [0, 1] -> (B, C, *(scale * spatial))."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"EDSR expects (B, {self.in_channels}, {', '.join('HW' if self.spatial_dims == 2 else 'DHW')}), "
                f"got shape {tuple(x.shape)}"
            )
        features = self.head(x)
        features = features + self.body(features)
        out = self.tail(self.upsample(features))
        if self.global_residual:
            out = out + upsample_baseline(x, self.scale)
        return out
