"""SRCNN (Dong et al., "Image Super-Resolution Using Deep Convolutional Networks", ECCV 2014 / TPAMI 2016), 2D or 3D.

Three convolutions on the bicubic (2D) / trilinear (3D) upsampled input: patch extraction (f1 x f1, n1 filters),
non-linear mapping (f2 x f2, n2 filters), reconstruction (f3 x f3, 1 filter per channel), ReLU after the first two.
The default is the TPAMI "9-5-5" network with n1 = 64, n2 = 32 (57,281 parameters for one 2D channel); the
ECCV base network "9-1-5" (8,032 weights + 97 biases = 8,129 parameters) is ``mid_kernel=1``.
"""

from __future__ import annotations

import torch
from monai.networks.layers import Conv
from torch import nn

from shared_models.registry import register_model
from shared_models.resample import upsample_baseline

SRCNN_PRESETS = {
    # every preset keeps the 9-5-5 kernels; tiny/small are narrower than the published 64/32 filters
    "tiny": {"width1": 32, "width2": 16},
    "small": {"width1": 48, "width2": 24},
    "base": {"width1": 64, "width2": 32},  # the published 9-5-5 layout (TPAMI 2016, section 4.3.2)
}


def _conv(spatial_dims: int, in_channels: int, out_channels: int, kernel: int) -> nn.Module:
    """k x k (x k) convolution with "same" padding (odd k): output size = input size."""
    return Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=kernel, padding=kernel // 2)


@register_model("srcnn", presets=SRCNN_PRESETS, head=("reconstruct",), conditioned="mapping")
class SRCNN(nn.Module):
    """interpolate x scale -> conv f1 (width1) + ReLU -> conv f2 (width2) + ReLU -> conv f3 (in_channels).

    Its reconstruction head (``personal = "head"``) is the last conv; ``condition = "acquisition"`` modulates the
    non-linear mapping's output (before its ReLU).

    Differences from the paper: "same" zero padding (the paper trains on valid convolutions, which shrink the
    output), so the output is exactly ``scale`` x the input; and, with ``global_residual`` (default, as EDSR
    here), the network predicts a correction added to the interpolated input (residual learning, as in VDSR)
    and its last conv starts at zero, so the untrained model returns exactly that interpolation. With
    ``global_residual=False`` it is the original SRCNN mapping interpolated -> HR directly.

    Input (B, in_channels, H, W) [or (B, in_channels, D, H, W) for ``spatial_dims=3``], intensities in [0, 1];
    output (B, in_channels, scale*H, scale*W) [scale on every spatial axis], not clamped.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        width1: int = 64,
        width2: int = 32,
        first_kernel: int = 9,
        mid_kernel: int = 5,
        last_kernel: int = 5,
        scale: int = 2,
        global_residual: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 1 or width1 < 1 or width2 < 1:
            raise ValueError(f"need in_channels, width1, width2 >= 1; got {in_channels}, {width1}, {width2}")
        kernels = (first_kernel, mid_kernel, last_kernel)
        if any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"kernel sizes must be odd and >= 1 (for 'same' padding), got {kernels}")
        if int(scale) != scale or scale < 2:
            raise ValueError(f"scale must be an integer >= 2, got {scale!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.scale = int(scale)
        self.global_residual = global_residual

        self.extract = _conv(spatial_dims, in_channels, width1, first_kernel)
        self.mapping = _conv(spatial_dims, width1, width2, mid_kernel)
        self.reconstruct = _conv(spatial_dims, width2, in_channels, last_kernel)
        self.act = nn.ReLU()
        if global_residual:
            nn.init.zeros_(self.reconstruct.weight)
            nn.init.zeros_(self.reconstruct.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) in [0, 1] -> (B, C, *(scale * spatial))."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SRCNN expects (B, {self.in_channels}, {', '.join('HW' if self.spatial_dims == 2 else 'DHW')}), "
                f"got shape {tuple(x.shape)}"
            )
        up = upsample_baseline(x, self.scale)
        out = self.reconstruct(self.act(self.mapping(self.act(self.extract(up)))))
        return out + up if self.global_residual else out
