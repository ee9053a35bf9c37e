"""Applying a trained SR model to a whole scan: slice by slice for 2D models, in overlapping tiles for 3D models.

Why not ``monai.inferers.sliding_window_inference`` (MONAI 1.6)? It does handle an output ``scale`` x larger than
the window (it derives a zoom factor from the first output), but it zero-pads any axis shorter than the window
and blends every window with one and the same weight map, so voxels a tile computed next to its own border (where
a convolution sees the tile's padding, not the neighbouring voxels) still count: a Gaussian map keeps ~3e-4 of
the centre weight there, "constant" mode all of it. With an untrained 3D residual CNN (= trilinear interpolation) on a
40x36x28 volume, 32^3 windows, overlap 0.25, Gaussian mode, it differs from the untiled forward by up to 0.25;
the loop here agrees to 1e-7. It gives each tile a weight that is zero next to the borders it shares with other
tiles, rises smoothly across the rest of the overlap, and stays 1 on the volume's own borders.

Large scans: :func:`iter_super_resolve` hands the output out in slabs along Z as they are finished (slice batches
for 2D models; for 3D models each row of tiles along Z, the finished slices before the next row starts), so a
writer can store them as they come and only a slab of the output is ever held; :func:`plan_inference` sizes the
slice batches and tiles from the memory free on the device.

Precision: every forward pass here runs in full float32, with CUDA's TF32 convolutions and matrix products turned
off for its duration (:func:`shared_models.precision.exact_float32`; a family's own whole-volume inference does
the same), so a scan super-resolved (or a site's validation scored) on a GPU equals the CPU result to float
rounding, whatever GPU the site has. Measured on an H100 with a 3D residual CNN whose weights were moved off their
start (``benchmarks/gpu_check.py``): TF32 left on, the tiled forward differed from the CPU's by
up to 5e-4 of the output range, and ``fedsr infer`` of a 96x96x48 phantom by up to 4.5e-2 (44 of 982 units at one
voxel); TF32 off, by 1e-6. Training keeps TF32 (client/device.py): its rounding is noise among the gradients'.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch
from torch import nn

from shared_models.image import ScanImage
from shared_models.precision import exact_float32
from shared_models.registry import family_of, model_spec

TILE = 32  # LR voxels per tile side (3D)
OVERLAP = 8  # LR voxels shared by neighbouring tiles
#: Largest slice batch and tile batch a plan picks (more gives no speed on a CPU and little on a GPU).
MAX_BATCH = 64
MAX_TILE_BATCH = 8
#: Tile sides a plan picks from (LR voxels); the smallest is taken when even it does not fit the budget.
TILE_SIDES = (96, 80, 64, 48, 32, 24, 16)
#: Share of the free memory a plan uses: the rest of a GPU is this process's own, a CPU's is shared with the
#: machine (and the scan, its normalised copy and the output slab live beside the activations).
GPU_SHARE = 0.5
CPU_SHARE = 0.25
CPU_BUDGET_CAP = 1 << 30  # bytes
#: Activations alive at once in a forward pass, in units of the largest one (a layer's input, its output and a
#: residual branch's skip).
LIVE_ACTIVATIONS = 3


@dataclass(frozen=True)
class InferencePlan:
    """How a scan is cut into forward passes.

    ``batch_size``: 2D slices (or a family's planes) per pass. ``tile``, ``overlap``: 3D tile side and the overlap
    of neighbouring tiles, in LR voxels. ``tile_batch_size``: 3D tiles per pass.
    """

    batch_size: int = 16
    tile: int = TILE
    overlap: int = OVERLAP
    tile_batch_size: int = 2


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
    _check_volume(lr_volume)
    plan = InferencePlan(batch_size, tile, overlap, tile_batch_size)
    apply = _family_apply(model)
    if apply is not None:  # e.g. a one-axis family restoring Z only
        out = apply(model, lr_volume, device=device, batch_size=batch_size)
        return out if slices is None else out[:, :, np.asarray(slices)]
    if model_spatial_dims(model) == 3:
        volume = torch.from_numpy(np.ascontiguousarray(lr_volume, dtype=np.float32))[None, None]
        if slices is None:
            return _joined(_tiled_slabs(model, volume, plan, device))[0, 0].clamp_(0.0, 1.0).numpy()
        wanted = np.asarray(slices, dtype=np.int64)
        n_z = _scale_of(model, volume, device) * lr_volume.shape[2]
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= n_z):
            raise ValueError(f"slices must lie in [0, {n_z}) for this 3D model, got {wanted.min()}..{wanted.max()}")
        need = np.zeros(n_z, dtype=bool)
        need[wanted] = True
        picked = {}  # output z -> its (sX, sY) slice; only needed slices are complete (see _tiled_slabs)
        for z0, slab in _tiled_slabs(model, volume, plan, device, need=need):
            picked.update((z0 + k, slab[0, 0, :, :, k]) for k in np.flatnonzero(need[z0 : z0 + slab.shape[-1]]))
        scale = n_z // lr_volume.shape[2]
        out = np.zeros((scale * lr_volume.shape[0], scale * lr_volume.shape[1], len(wanted)), dtype=np.float32)
        for k, z in enumerate(wanted):
            out[:, :, k] = picked[z].clamp(0.0, 1.0).numpy()
        return out
    index = np.arange(lr_volume.shape[2]) if slices is None else np.asarray(slices)
    return np.concatenate([block for _, block in _slice_batches(model, lr_volume, index, plan.batch_size, device)],
                          axis=2)


def iter_super_resolve(
    model: nn.Module,
    lr_volume: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    plan: InferencePlan | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """The output of :func:`super_resolve_voxels` slab by slab along Z, each as soon as it is finished.

    Yields ``(z0, block)``: float32 (X', Y', n) clamped to [0, 1], output slices ``z0 .. z0 + n - 1``, in order and
    covering the whole output (of shape :func:`sr_factors` x the input's). A 2D model yields each batch of slices;
    a 3D model each row of tiles along Z (the slices no later tile reaches), so only that slab of the output and
    one batch of tiles are in memory; a family's own whole-volume inference (e.g. through-plane) runs whole and
    yields once. ``plan``: batch and tile sizes (default: :func:`plan_inference` for this volume and device).
    The model is put in eval mode on ``device``.
    """
    _check_volume(lr_volume)
    model.eval().to(device)
    plan = plan_inference(model, lr_volume.shape, device=device) if plan is None else plan
    apply = _family_apply(model)
    if apply is not None:
        with torch.no_grad():
            whole = apply(model, lr_volume, device=device, batch_size=plan.batch_size)
        yield 0, whole
    elif model_spatial_dims(model) == 3:
        volume = torch.from_numpy(np.ascontiguousarray(lr_volume, dtype=np.float32))[None, None]
        for z0, slab in _tiled_slabs(model, volume, plan, device):
            yield z0, slab[0, 0].clamp_(0.0, 1.0).numpy()
    else:
        yield from _slice_batches(model, lr_volume, np.arange(lr_volume.shape[2]), plan.batch_size, device)


def sr_factors(model: nn.Module, device: torch.device | str = "cpu") -> tuple[int, int, int]:
    """How many output voxels the model makes of one input voxel along X, Y and Z, e.g. (2, 2, 1) for in-plane
    SR, (1, 1, 2) for through-plane, (2, 2, 2) for a 3D model: measured on a small zero volume by the same path
    :func:`super_resolve_voxels` takes (so it also holds for a family's own inference)."""
    probe = np.zeros((16, 16, 8), dtype=np.float32)
    out = super_resolve_voxels(model, probe, device=device)
    factors = tuple(o / n for o, n in zip(out.shape, probe.shape))
    if not all(float(f).is_integer() and f >= 1 for f in factors):
        raise ValueError(f"the model maps {probe.shape} to {out.shape}: not an integer factor per axis")
    return tuple(int(f) for f in factors)  # type: ignore[return-value]


def memory_budget(device: torch.device | str) -> int:
    """Bytes a plan may spend on activations: :data:`GPU_SHARE` of the GPU's free memory, or :data:`CPU_SHARE` of
    the machine's available memory capped at :data:`CPU_BUDGET_CAP`."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_SHARE)
    return int(min(_available_ram() * CPU_SHARE, CPU_BUDGET_CAP))


def _available_ram() -> int:
    """The kernel's estimate of memory available without swapping (``MemAvailable``), in bytes. Read from
    /proc/meminfo (psutil, which does the same, is not a dependency); elsewhere the free pages."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def activation_bytes_per_voxel(model: nn.Module, spatial_dims: int, device: torch.device | str = "cpu") -> float:
    """Estimated bytes a forward pass holds per input voxel: float32 input, output and :data:`LIVE_ACTIVATIONS`
    times the largest activation any module returns, measured on a small probe (8^3 or 16^2 voxels) with
    forward hooks. Convolutional and windowed-attention networks scale linearly with the input's voxels."""
    probe = torch.zeros((1, 1, *((8,) * 3 if spatial_dims == 3 else (16, 16))), device=device)
    largest = 0

    def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    handles = [module.register_forward_hook(record) for module in model.modules()]
    try:
        out = model.eval().to(device)(probe)
    finally:
        for handle in handles:
            handle.remove()
    return 4.0 * (LIVE_ACTIVATIONS * largest + out.numel() + probe.numel()) / probe.numel()


def plan_inference(
    model: nn.Module,
    shape: tuple[int, int, int],
    *,
    device: torch.device | str = "cpu",
    memory_bytes: int | None = None,
    batch_size: int | None = None,
    tile: int | None = None,
    overlap: int = OVERLAP,
) -> InferencePlan:
    """Batch and tile sizes for a scan of ``shape`` (X, Y, Z) that fit ``memory_bytes`` (default:
    :func:`memory_budget`). Sizes given are kept; the others are chosen.

    2D models (and a family's own inference, whose planes are at most max(X, Y) x Z): as many slices per pass as
    the budget holds at :func:`activation_bytes_per_voxel`, 1 to :data:`MAX_BATCH`. 3D models: the largest of
    :data:`TILE_SIDES` whose tile activations plus the output slab it makes (s^3 X Y tile float32 values) fit,
    then as many tiles per pass as the rest holds (``batch_size``, if given, is the tiles per pass).
    """
    budget = memory_budget(device) if memory_bytes is None else int(memory_bytes)
    x, y, z = shape
    apply = _family_apply(model)
    if apply is not None or model_spatial_dims(model) != 3:
        per_voxel = activation_bytes_per_voxel(model, 2, device)
        plane, count = (x * y, z) if apply is None else (max(x, y) * z, x + y)  # voxels per pass item, items
        chosen = batch_size or int(np.clip(budget // max(per_voxel * plane, 1.0), 1, min(MAX_BATCH, count)))
        return InferencePlan(batch_size=chosen, overlap=overlap)
    per_voxel = activation_bytes_per_voxel(model, 3, device)
    scale = _scale_of(model, torch.zeros(1, 1, 8, 8, 8), device)
    slab_per_side = 4.0 * scale**3 * x * y  # bytes of output slab per LR voxel of tile side
    fits = [t for t in TILE_SIDES if t > overlap and per_voxel * t**3 + slab_per_side * t <= budget]
    side = tile or (fits[0] if fits else min(t for t in TILE_SIDES if t > overlap))
    spare = budget - slab_per_side * side
    tiles = batch_size or int(np.clip(spare // max(per_voxel * side**3, 1.0), 1, MAX_TILE_BATCH))
    return InferencePlan(tile=side, overlap=overlap, tile_batch_size=tiles)


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
    plan = InferencePlan(tile=tile, overlap=overlap, tile_batch_size=tile_batch_size)
    return _joined(_tiled_slabs(model, lr.float().cpu(), plan, device))


def _check_volume(lr_volume: np.ndarray) -> None:
    if lr_volume.ndim != 3:
        raise ValueError(f"lr_volume must be (X, Y, Z), got shape {lr_volume.shape}")


def _joined(slabs: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The slabs of :func:`_tiled_slabs` as one (B, C, X', Y', Z') tensor."""
    return torch.cat([slab for _, slab in slabs], dim=-1)


@torch.no_grad()
def _slice_batches(
    model: nn.Module, lr_volume: np.ndarray, index: np.ndarray, batch_size: int, device: torch.device | str
) -> Iterator[tuple[int, np.ndarray]]:
    """2D model, slice by slice: ``(position in index, float32 (sX, sY, n) clamped)`` per batch of ``index``."""
    for start in range(0, len(index), batch_size):
        chunk = np.moveaxis(lr_volume[:, :, index[start : start + batch_size]], 2, 0)[:, None]
        batch = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
        with exact_float32():
            out = model(batch).clamp_(0.0, 1.0)[:, 0].cpu().numpy()
        yield start, np.moveaxis(out, 0, 2)


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


@torch.no_grad()
def _tiled_slabs(
    model: nn.Module,
    lr: torch.Tensor,
    plan: InferencePlan,
    device: torch.device | str,
    *,
    need: np.ndarray | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(B, C, D, H, W) CPU float32 -> ``(z0, slab)``: blended (not clamped) float32 (B, C, sD, sH, n) output
    slices ``z0 ..``, in order, one slab per row of tiles along W (the slices no later row reaches).

    ``need``: (sW,) bool, the output slices wanted (default: all); a row of tiles feeding none of them is not
    computed, so slices outside ``need`` may come out incomplete.
    """
    tile, overlap, tile_batch_size = plan.tile, plan.overlap, plan.tile_batch_size
    if tile < 1 or not 0 <= overlap < tile or tile_batch_size < 1:
        raise ValueError(
            f"need tile >= 1, 0 <= overlap < tile, tile_batch_size >= 1; got {tile}, {overlap}, {tile_batch_size}"
        )
    spatial = tuple(lr.shape[2:])
    axes = [_tile_starts(n, tile, overlap) for n in spatial]
    sizes = tuple(size for _, size in axes)
    scale = _scale_of(model, lr, device)
    n_z = scale * spatial[2]
    need = np.ones(n_z, dtype=bool) if need is None else need

    weights = [
        {s: _axis_weight(s, size, n, scale, overlap) for s in starts} for (starts, size), n in zip(axes, spatial)
    ]
    total = [torch.zeros(scale * n) for n in spatial]  # the tiles form a grid: summed weight = outer product
    for axis, (starts, size) in enumerate(axes):
        for s in starts:
            total[axis][scale * s : scale * (s + size)] += weights[axis][s]
    in_plane = total[0][:, None, None] * total[1][None, :, None]

    b, z_starts = lr.shape[0], axes[2][0]
    slab = torch.zeros(*lr.shape[:2], scale * spatial[0], scale * spatial[1], 0)
    slab_z0 = 0  # output z of the slab's first slice: everything before it has been handed out
    for row, z0 in enumerate(z_starts):
        lo, hi = scale * z0, scale * (z0 + sizes[2])
        if hi > slab_z0 + slab.shape[-1]:
            slab = torch.cat([slab, slab.new_zeros(*slab.shape[:-1], hi - slab_z0 - slab.shape[-1])], dim=-1)
        if need[lo:hi].any():
            boxes = [(x0, y0) for x0 in axes[0][0] for y0 in axes[1][0]]
            for first in range(0, len(boxes), tile_batch_size):
                chunk = boxes[first : first + tile_batch_size]
                batch = torch.cat([
                    lr[:, :, x0 : x0 + sizes[0], y0 : y0 + sizes[1], z0 : z0 + sizes[2]] for x0, y0 in chunk
                ])
                with exact_float32():
                    pred = model(batch.to(device)).float().cpu()
                if pred.shape[2:] != tuple(scale * n for n in sizes):
                    raise ValueError(f"model output {tuple(pred.shape)} is not {scale} x the tile {sizes}")
                for i, (x0, y0) in enumerate(chunk):
                    wx, wy, wz = weights[0][x0], weights[1][y0], weights[2][z0]
                    region = slab[:, :, scale * x0 : scale * (x0 + sizes[0]), scale * y0 : scale * (y0 + sizes[1]),
                                  lo - slab_z0 : hi - slab_z0]
                    region += pred[i * b : (i + 1) * b] * (wx[:, None, None] * wy[None, :, None] * wz)
        end = scale * z_starts[row + 1] if row + 1 < len(z_starts) else n_z
        done = slab[..., : end - slab_z0] / (in_plane * total[2][slab_z0:end])
        yield slab_z0, done
        slab, slab_z0 = slab[..., end - slab_z0 :], end


def _scale_of(model: nn.Module, lr: torch.Tensor, device: torch.device | str) -> int:
    """A 3D model's SR factor: its spec's ``scale``, else measured on a small corner of ``lr`` (B, C, D, H, W)."""
    try:
        scale = model_spec(model)["params"].get("scale")
    except (ValueError, AttributeError):
        scale = None
    if scale is None:
        probe = lr[:1, :, :8, :8, :8]
        with exact_float32():
            shape = model(probe.to(device)).shape[2:]
        ratios = {o / n for o, n in zip(shape, probe.shape[2:])}
        if len(ratios) != 1 or not float(next(iter(ratios))).is_integer():
            raise ValueError(f"cannot tell the model's scale: {tuple(probe.shape)} -> {tuple(shape)}")
        scale = next(iter(ratios))
    return int(scale)
