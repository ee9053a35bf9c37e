"""SwinIR-light-style transformer for 2D super-resolution (Liang et al., "SwinIR: Image Restoration Using Swin
Transformer", ICCVW 2021; reference code github.com/JingyunLiang/SwinIR, ``upsampler="pixelshuffledirect"``).

conv 3x3 (shallow features) -> LayerNorm -> n_groups residual Swin transformer groups (RSTB: ``depth`` Swin blocks
alternating regular and shifted window attention with relative position bias, then a 3x3 conv, plus the group's
skip) -> LayerNorm -> conv 3x3 + long skip from the shallow features -> one conv to C*s^2 channels + PixelShuffle.

Written here rather than reusing ``monai.networks.nets.swin_unetr.SwinTransformerBlock``/``WindowAttention``
(MONAI 1.6): those take (B, D, H, W, C) or (B, H, W, C) with the attention mask passed by the caller on each call
and fold the windows into the batch axis inside the attention; this module keeps every layer batch-first
(qkv/proj projections run on the (B, H, W, C) map before windows are cut, the mask is built from the input size),
which is what per-sample-gradient (Opacus) hooks need, and needs no padding bookkeeping borrowed from a
segmentation network. The arithmetic is the reference code's: head_dim**-0.5 scaling, a learned
(2w-1)^2 x heads bias table indexed by relative position, cyclic shift by w//2 on odd blocks with a -100 mask
between regions that the shift made adjacent, trunc-normal(0.02) Linear/bias-table initialisation.

Left out of the reference code: stochastic depth (drop_path, a training regulariser without parameters), the
RGB mean shift (replaced by ``global_residual``), dropout, absolute position embedding (off in SwinIR too).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from shared_models.registry import register_model
from shared_models.resample import upsample_baseline

SWINIR_PRESETS = {
    "tiny": {"embed_dim": 24, "n_groups": 2, "depth": 2, "num_heads": 3, "window_size": 8, "mlp_ratio": 2.0},
    "small": {"embed_dim": 48, "n_groups": 3, "depth": 4, "num_heads": 4, "window_size": 8, "mlp_ratio": 2.0},
    # the published SwinIR-light layout: embed 60, depths (6, 6, 6, 6), heads (6, 6, 6, 6), window 8, mlp 2
    "base": {"embed_dim": 60, "n_groups": 4, "depth": 6, "num_heads": 6, "window_size": 8, "mlp_ratio": 2.0},
}
# _CONTIGUOUS: channels-last maps go back to contiguous (B, C, H, W) before every conv. A permuted input makes
# the conv (and the convs after it) run in channels_last memory format, for which Opacus 1.6's Conv2d per-sample
# gradients come out wrong (measured: 59% relative error on a lone conv, 100% inside this network).
_MASKED = -100.0  # the reference code's additive mask value between regions that a cyclic shift made adjacent


@functools.lru_cache(maxsize=16)
def _relative_position_index(window: int, device: torch.device) -> torch.Tensor:
    """(w*w * w*w,) long: row-major index into the (2w-1)^2 bias table of the offset between two window tokens."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # (2, N, N), each in [0, 2w-2]
    return (offsets[0] * (2 * window - 1) + offsets[1]).reshape(-1).to(device)


def _partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, w*w, C), windows in row-major order (H, W multiples of ``window``)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def _merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_partition`: (B, nW, w*w, C) -> (B, H, W, C)."""
    b, _, _, c = windows.shape
    x = windows.reshape(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


@functools.lru_cache(maxsize=16)
def _shift_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(nW, N, N) additive attention mask of the shifted windows: 0 within a region, -100 across regions."""
    regions = torch.zeros(1, h, w, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            regions[:, rows, cols, :] = label
            label += 1
    labels = _partition(regions, window)[0, :, :, 0]  # (nW, N)
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape).masked_fill_(different, _MASKED).to(device)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) w x w windows with a learned relative position bias.

    Input: (B, H, W, 3C) = the concatenated q, k, v projections of a (B, H, W, C) map, H and W multiples of w.
    Output: (B, H, W, C), the per-head attention outputs concatenated (before the output projection).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift must be in [0, window_size), got {shift_size} for window {window_size}")
        self.dim, self.num_heads, self.window_size, self.shift_size = dim, num_heads, window_size, shift_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # The relative position index and the shift mask are constants of the layout, built on use (and cached)
        # rather than registered as buffers: the state_dict sent to the coordinator holds parameters only, and
        # Opacus refuses trainable layers that carry buffers.

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3C) -> (B, H, W, C)."""
        b, h, w, _ = qkv.shape
        win, shift, heads = self.window_size, self.shift_size, self.num_heads
        if h % win or w % win:
            raise ValueError(f"feature map {h}x{w} is not a multiple of the window {win}")
        if shift:
            qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
        windows = _partition(qkv, win)  # (B, nW, N, 3C)
        n_windows, n = windows.shape[1], windows.shape[2]
        q, k, v = windows.reshape(b, n_windows, n, 3, heads, self.dim // heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_position_bias_table[_relative_position_index(win, qkv.device)]
        bias = bias.reshape(n, n, heads).permute(2, 0, 1)  # (heads, N, N)
        if shift:
            bias = bias[None] + _shift_mask(h, w, win, shift, qkv.device)[:, None]  # (nW, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, nW, heads, N, head_dim)
        out = _merge(out.transpose(2, 3).reshape(b, n_windows, n, self.dim), win, h, w)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, shift={self.shift_size}"


class SwinBlock(nn.Module):
    """Pre-norm Swin transformer block on a channels-last map: x + proj(W-MSA(qkv(LN(x)))), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift_size)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> same shape."""
        x = x + self.proj(self.attn(self.qkv(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class ResidualSwinGroup(nn.Module):
    """RSTB: ``depth`` Swin blocks (shift 0, w/2, 0, w/2, ...) -> 3x3 conv, plus the group's input."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio)
              for i in range(depth))
        )
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) channels-last -> same shape."""
        y = self.blocks(x).permute(0, 3, 1, 2).contiguous()  # see _CONTIGUOUS
        return x + self.conv(y).permute(0, 2, 3, 1)


@register_model("swinir", presets=SWINIR_PRESETS, head=("upsample",), conditioned="conv_first")
class SwinIR(nn.Module):
    """SwinIR-light: shallow conv -> residual Swin groups -> conv + long skip -> conv to C*s^2 + PixelShuffle.

    Its reconstruction head (``personal = "head"``) is the upsampler (conv + PixelShuffle);
    ``condition = "acquisition"`` modulates the shallow features (so the transformer groups and the long skip both
    see the acquisition).

    Sizes that are not multiples of ``window_size`` are padded on the bottom/right by reflection (by replication
    when the image is smaller than the padding) and the output cropped back to ``scale`` x the input. With
    ``global_residual`` (default, as EDSR here) the bicubic-upsampled input is added and the upsampling conv
    starts at zero, so the untrained model returns exactly bicubic interpolation. ``body_conv=False`` drops the
    3x3 conv after the last group (one embed_dim^2*9 conv; the paper's parameter counts leave it out).

    Input (B, in_channels, H, W), intensities in [0, 1]; output (B, in_channels, scale*H, scale*W), not clamped.
    2D only: ``spatial_dims`` exists so that every family answers the same question, and must be 2.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        embed_dim: int = 60,
        n_groups: int = 4,
        depth: int = 6,
        num_heads: int = 6,
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        body_conv: bool = True,
        scale: int = 2,
        global_residual: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"swinir is 2D only: spatial_dims must be 2, got {spatial_dims}")
        if in_channels < 1 or embed_dim < 1 or n_groups < 1 or depth < 1 or window_size < 2 or mlp_ratio <= 0:
            raise ValueError(
                "need in_channels, embed_dim, n_groups, depth >= 1, window_size >= 2, mlp_ratio > 0; got "
                f"{in_channels}, {embed_dim}, {n_groups}, {depth}, {window_size}, {mlp_ratio}"
            )
        if int(scale) != scale or scale < 2:
            raise ValueError(f"scale must be an integer >= 2, got {scale!r}")
        self.spatial_dims = 2
        self.in_channels = in_channels
        self.window_size = window_size
        self.scale = int(scale)
        self.global_residual = global_residual

        self.conv_first = nn.Conv2d(in_channels, embed_dim, 3, padding=1)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.groups = nn.Sequential(
            *(ResidualSwinGroup(embed_dim, depth, num_heads, window_size, mlp_ratio) for _ in range(n_groups))
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1) if body_conv else nn.Identity()
        self.upsample = nn.Sequential(
            nn.Conv2d(embed_dim, in_channels * self.scale**2, 3, padding=1), nn.PixelShuffle(self.scale)
        )
        self.apply(_init_weights)
        if global_residual:
            nn.init.zeros_(self.upsample[0].weight)
            nn.init.zeros_(self.upsample[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C, scale*H, scale*W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SwinIR expects (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[2:]
        pad_h, pad_w = -h % self.window_size, -w % self.window_size
        padded = x
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            padded = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        shallow = self.conv_first(padded)
        tokens = self.norm(self.groups(self.patch_norm(shallow.permute(0, 2, 3, 1))))
        deep = self.conv_after_body(tokens.permute(0, 3, 1, 2).contiguous()) + shallow  # see _CONTIGUOUS
        out = self.upsample(deep)[:, :, : h * self.scale, : w * self.scale]
        if self.global_residual:
            out = out + upsample_baseline(x, self.scale)
        return out


def _init_weights(module: nn.Module) -> None:
    """The reference initialisation: Linear weights trunc-normal(0.02) with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
