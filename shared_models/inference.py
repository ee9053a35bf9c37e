"""Applying a trained SR model to a whole scan: slice by slice for 2D models, in overlapping tiles for 3D models.

Why not ``monai.inferers.sliding_window_inference`` (MONAI 1.6)? It does handle an output ``scale`` x larger than
the window (it derives a zoom factor from the first output), but it zero-pads any axis shorter than the window
and blends every window with one and the same weight map, so voxels a tile computed next to its own border (where
a convolution sees the tile's padding, not the neighbouring voxels) still count: a Gaussian map keeps ~3e-4 of
the centre weight there, "constant" mode all of it. With an untrained 3D residual CNN (= trilinear interpolation) on a
40x36x28 volume, 32^3 windows, overlap 0.25, Gaussian mode, it differs from the untiled forward by up to 0.25;
the loop here agrees to 1e-7. It gives each tile a weight that is zero next to the borders it shares with other
tiles, rises smoothly across the rest of the overlap, and stays 1 on the volume's own borders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import torch
from torch import nn

from shared_models.image import ScanImage
from shared_models.registry import family_of, model_spec

TILE = 32  # LR voxels per tile side (3D)
OVERLAP = 8  # LR voxels shared by neighbouring tiles


def _family_apply(model: nn.Module):
    """The family's own whole-volume inference, or None (the 2D/3D paths here; also for unregistered models)."""
    try:
        return family_of(model).apply
    except (ValueError, AttributeError):
        return None


def model_spatial_dims(model: nn.Module) -> int:
    """2 or 3: ``model_spec(model)["params"]["spatial_dims"]``; 2 for models without that parameter or not built
    by ``build_model`` (the slice-by-slice path, as before 3D models existed)."""
    try:
        return int(model_spec(model)["params"].get("spatial_dims", 2))
    except (ValueError, AttributeError):
        return 2


@overload
def super_resolve(model: nn.Module, lr_volume: ScanImage, **options: Any) -> ScanImage: ...


@overload
def super_resolve(model: nn.Module, lr_volume: np.ndarray, **options: Any) -> np.ndarray: ...


def super_resolve(model: nn.Module, lr_volume: np.ndarray | ScanImage, **options: Any) -> np.ndarray | ScanImage:
    """Super-resolve a scan (see :func:`super_resolve_voxels` for the options).

    Given a :class:`~shared_models.image.ScanImage`, returns one: the output voxels with the affine updated for the
    new grid (voxels smaller by the scale along the restored axes, the field of view kept), the modality and the
    intensity mapping carried over, so the result can be written back in patient space and scanner units. Given an
    array, returns an array. ``slices`` (a partial output) is only for arrays.
    """
    if isinstance(lr_volume, ScanImage):
        if options.get("slices") is not None:
            raise ValueError("slices: a partial output has no grid of its own; pass the voxel array instead")
        return lr_volume.with_voxels(super_resolve_voxels(model, lr_volume.voxels, **options))
    return super_resolve_voxels(model, lr_volume, **options)


@torch.no_grad()
def super_resolve_voxels(
    model: nn.Module,
    lr_volume: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    slices: np.ndarray | Sequence[int] | None = None,
    batch_size: int = 16,
    tile: int = TILE,
    overlap: int = OVERLAP,
    tile_batch_size: int = 2,
) -> np.ndarray:
    """Super-resolve a scan with a 2D model (in-plane, slice by slice), a 3D model (whole volume, in tiles) or a
    family's own whole-volume inference (e.g. through-plane: (X, Y, Z) -> (X, Y, s*Z), ``slices`` then index the
    output Z).

    Args:
        model: built by ``build_model``; ``spatial_dims`` in its spec picks the path (missing: 2D).
        lr_volume: float32 (X, Y, Z) in [0, 1].
        device: where the model runs; tiles/slices are moved there and results back to the CPU.
        slices: indices along Z of the *output* to return (default: all). For a 2D model Z is not upsampled,
            so these are LR slice indices, and only those slices are computed. For a 3D model they index the
            s*Z output slices, and tiles that contribute to none of them are skipped.
        batch_size: 2D only, slices per forward pass.
        tile, overlap: 3D only, tile side and overlap between neighbouring tiles, in LR voxels (see
            :func:`tiled_forward`).
        tile_batch_size: 3D only, tiles per forward pass.

    Returns:
        2D model: float32 (s*X, s*Y, len(slices)); 3D model: float32 (s*X, s*Y, len(slices)) where ``slices``
        defaults to all s*Z output slices, i.e. (s*X, s*Y, s*Z). Clamped to [0, 1]; the model stays in eval mode.
    """
    model.eval().to(device)
    if lr_volume.ndim != 3:
        raise ValueError(f"lr_volume must be (X, Y, Z), got shape {lr_volume.shape}")
    apply = _family_apply(model)
    if apply is not None:  # e.g. a one-axis family restoring Z only
        out = apply(model, lr_volume, device=device, batch_size=batch_size)
        return out if slices is None else out[:, :, np.asarray(slices)]
    if model_spatial_dims(model) == 3:
        volume = torch.from_numpy(np.ascontiguousarray(lr_volume, dtype=np.float32))[None, None]
        out = _tiled(
            model, volume, tile=tile, overlap=overlap, tile_batch_size=tile_batch_size, device=device,
            out_z=None if slices is None else np.asarray(slices, dtype=np.int64),
        )
        return out[0, 0].clamp_(0.0, 1.0).numpy()
    index = np.arange(lr_volume.shape[2]) if slices is None else np.asarray(slices)
    outputs = []
    for start in range(0, len(index), batch_size):
        chunk = np.moveaxis(lr_volume[:, :, index[start : start + batch_size]], 2, 0)[:, None]
        batch = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
        outputs.append(model(batch).clamp_(0.0, 1.0)[:, 0].cpu())
    return np.moveaxis(torch.cat(outputs).numpy(), 0, 2)


@torch.no_grad()
def tiled_forward(
    model: nn.Module,
    lr: torch.Tensor,
    *,
    tile: int = TILE,
    overlap: int = OVERLAP,
    tile_batch_size: int = 2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Apply a 3D SR model to (B, C, D, H, W) in overlapping tiles; returns (B, C, sD, sH, sW) on the CPU.

    Tiles are ``tile``^3 LR voxels (an axis shorter than ``tile`` is one tile of its full length), neighbours
    share at least ``overlap`` voxels. Each tile's output is weighted per axis by 0 on the first
    ``overlap // 4`` LR voxels next to a border shared with another tile, a raised-cosine ramp from 0 to 1 over
    the rest of the overlap, and 1 elsewhere (including the volume's own borders); the weighted outputs are
    divided by the summed weights. Where a model's receptive field reaches no further than ``overlap // 4`` LR
    voxels, the result equals the untiled forward (up to float rounding); beyond that the ramp hides the seams.
    Not clamped. ``device``: where the model runs (default: where its parameters are). The model is used as it is
    (call ``model.eval()`` first); ``super_resolve`` does that for you.
    """
    if lr.ndim != 5:
        raise ValueError(f"tiled_forward expects (B, C, D, H, W), got shape {tuple(lr.shape)}")
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    return _tiled(model, lr.float().cpu(), tile=tile, overlap=overlap, tile_batch_size=tile_batch_size,
                  device=device, out_z=None)


def _tile_starts(length: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """Start indices along one axis and the tile length there: evenly spread, first at 0, last ending at
    ``length``, neighbours overlapping by >= ``overlap``."""
    if length <= tile:
        return [0], length
    count = math.ceil((length - overlap) / (tile - overlap))
    return [int(s) for s in np.linspace(0, length - tile, count).round()], tile


def _axis_weight(start: int, size: int, length: int, scale: int, overlap: int) -> torch.Tensor:
    """(scale*size,) blending weight of one tile along one axis (see :func:`tiled_forward`)."""
    margin = overlap // 4
    ramp = overlap - 2 * margin
    centres = (torch.arange(scale * size, dtype=torch.float64) + 0.5) / scale  # LR coordinates within the tile

    def rise(distance: torch.Tensor) -> torch.Tensor:
        if ramp <= 0:
            return (distance > margin).double()
        r = ((distance - margin) / ramp).clamp(0.0, 1.0)
        return 0.5 - 0.5 * torch.cos(math.pi * r)

    weight = torch.ones_like(centres)
    if start > 0:
        weight = weight * rise(centres)
    if start + size < length:
        weight = weight * rise(size - centres)
    return weight.float()


def _tiled(
    model: nn.Module,
    lr: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    tile_batch_size: int,
    device: torch.device | str,
    out_z: np.ndarray | None,
) -> torch.Tensor:
    """(B, C, D, H, W) CPU float32 -> (B, C, sD, sH, len(out_z) or sW) CPU float32, blended (not clamped)."""
    if tile < 1 or not 0 <= overlap < tile or tile_batch_size < 1:
        raise ValueError(
            f"need tile >= 1, 0 <= overlap < tile, tile_batch_size >= 1; got {tile}, {overlap}, {tile_batch_size}"
        )
    spatial = tuple(lr.shape[2:])
    axes = [_tile_starts(n, tile, overlap) for n in spatial]
    sizes = tuple(size for _, size in axes)
    scale = _scale_of(model, lr, sizes, device)

    # output z slices: accumulate the distinct ones in order, then gather (slices may be unsorted or repeat)
    n_z = scale * spatial[2]
    wanted = np.arange(n_z) if out_z is None else np.asarray(out_z, dtype=np.int64)
    if len(wanted) and (wanted.min() < 0 or wanted.max() >= n_z):
        raise ValueError(f"slices must lie in [0, {n_z}) for this 3D model, got {wanted.min()}..{wanted.max()}")
    distinct, gather = np.unique(wanted, return_inverse=True)
    position = np.full(n_z, -1)
    position[distinct] = np.arange(len(distinct))

    weights = [
        {s: _axis_weight(s, size, n, scale, overlap) for s in starts} for (starts, size), n in zip(axes, spatial)
    ]
    out = torch.zeros(*lr.shape[:2], scale * spatial[0], scale * spatial[1], len(distinct))
    total = [torch.zeros(scale * n) for n in spatial]  # the tiles form a grid: summed weight = outer product
    for axis, (starts, size) in enumerate(axes):
        for s in starts:
            total[axis][scale * s : scale * (s + size)] += weights[axis][s]

    boxes = []
    for z0 in axes[2][0]:
        keep = np.flatnonzero(position[scale * z0 : scale * (z0 + sizes[2])] >= 0)
        if len(keep):  # tiles feeding no requested output slice are skipped
            boxes += [((x0, y0, z0), keep) for x0 in axes[0][0] for y0 in axes[1][0]]
    b = lr.shape[0]
    for first in range(0, len(boxes), tile_batch_size):
        chunk = boxes[first : first + tile_batch_size]
        batch = torch.cat(
            [lr[(slice(None), slice(None), *(slice(s, s + n) for s, n in zip(box, sizes)))] for box, _ in chunk]
        )
        pred = model(batch.to(device)).float().cpu()
        if pred.shape[2:] != tuple(scale * n for n in sizes):
            raise ValueError(f"model output {tuple(pred.shape)} is not {scale} x the tile {sizes}")
        for i, ((x0, y0, z0), keep) in enumerate(chunk):
            wx, wy, wz = weights[0][x0], weights[1][y0], weights[2][z0][keep]
            weighted = pred[i * b : (i + 1) * b][..., keep] * (wx[:, None, None] * wy[None, :, None] * wz)
            region = out[:, :, scale * x0 : scale * (x0 + sizes[0]), scale * y0 : scale * (y0 + sizes[1])]
            region.index_add_(4, torch.from_numpy(position[scale * z0 + keep]), weighted)
    wz_total = total[2][torch.from_numpy(distinct)]
    out /= total[0][:, None, None] * total[1][None, :, None] * wz_total[None, None, :]
    return out if out_z is None else out[..., torch.from_numpy(gather)]


def _scale_of(model: nn.Module, lr: torch.Tensor, sizes: tuple[int, ...], device: torch.device | str) -> int:
    """The model's SR factor: its spec's ``scale``, else measured on one (small) tile."""
    try:
        scale = model_spec(model)["params"].get("scale")
    except (ValueError, AttributeError):
        scale = None
    if scale is None:
        probe = lr[:1, :, : min(sizes[0], 8), : min(sizes[1], 8), : min(sizes[2], 8)]
        shape = model(probe.to(device)).shape[2:]
        ratios = {o / n for o, n in zip(shape, probe.shape[2:])}
        if len(ratios) != 1 or not float(next(iter(ratios))).is_integer():
            raise ValueError(f"cannot tell the model's scale: {tuple(probe.shape)} -> {tuple(shape)}")
        scale = next(iter(ratios))
    return int(scale)
