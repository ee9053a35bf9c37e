"""A scan in memory with what is needed to put a result back where it belongs: voxels, affine, modality and the
invertible intensity mapping (as TorchIO's ``Image`` carries its affine).

Grid convention (as :mod:`client.degrade` and :func:`shared_models.resample.upsample_baseline`,
``align_corners=False``): when an axis of ``n`` voxels is resampled to ``m`` voxels over the same field of view,
new voxel ``j`` sits at old voxel coordinate ``(j + 0.5) * n / m - 0.5``. Reducing by ``s`` puts each new voxel at
the centre of the ``s`` old voxels it replaces; enlarging by ``s`` puts the first new voxel ``(s - 1) / (2 s)`` of an
old voxel before the old first centre. The field of view (the outer faces of the voxel grid) does not move, so
every anatomical point keeps its world position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

#: How the [lo, hi] of a :class:`Normalisation` was chosen.
NORMALISATION_KINDS = ("ct-window", "mr-percentile")
MODALITIES = ("MR", "CT")


@dataclass(frozen=True)
class Normalisation:
    """Linear map of scanner units [lo, hi] onto [0, 1]; ``kind`` says how lo and hi were chosen."""

    kind: str
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if self.kind not in NORMALISATION_KINDS:
            raise ValueError(f"normalisation kind must be one of {NORMALISATION_KINDS}, got {self.kind!r}")
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.hi > self.lo):
            raise ValueError(f"normalisation needs finite lo < hi, got lo={self.lo}, hi={self.hi}")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scanner units -> float32 in [0, 1] (values outside [lo, hi] are clipped). Any shape."""
        y = (np.asarray(x, dtype=np.float32) - np.float32(self.lo)) / np.float32(self.hi - self.lo)
        return np.clip(y, 0.0, 1.0, out=y)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """[0, 1] -> float32 scanner units (HU for CT). Any shape; not clipped."""
        return np.asarray(y, dtype=np.float32) * np.float32(self.hi - self.lo) + np.float32(self.lo)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: {"kind", "lo", "hi"}."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalisation:
        """Inverse of :meth:`to_dict`; ValueError on missing or unknown keys."""
        keys = set(data)
        if keys != {"kind", "lo", "hi"}:
            raise ValueError(f"normalisation dict needs exactly the keys kind, lo, hi; got {sorted(keys)}")
        return cls(str(data["kind"]), float(data["lo"]), float(data["hi"]))


@dataclass(frozen=True, eq=False)
class ScanImage:
    """One scan, normalised, with its place in the world.

    ``voxels``: float32 (X, Y, Z) in [0, 1]. ``affine``: (4, 4) float64, voxel index (i, j, k, 1) -> world mm
    (RAS+). ``modality``: "MR" or "CT". ``normalisation``: maps ``voxels`` back to scanner units (HU for CT).
    """

    voxels: np.ndarray
    affine: np.ndarray
    modality: str
    normalisation: Normalisation

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise ValueError(f"voxels must be (X, Y, Z), got shape {self.voxels.shape}")
        if np.shape(self.affine) != (4, 4):
            raise ValueError(f"affine must be (4, 4), got {np.shape(self.affine)}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm between voxel centres along X, Y, Z."""
        x, y, z = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(x), float(y), float(z)

    def with_voxels(self, voxels: np.ndarray) -> ScanImage:
        """The same field of view sampled on ``voxels``' grid: each axis resized from this image's size to the new
        one (see the module's grid convention), the affine changed to match. E.g. an SR output of ``s`` times the
        size along X and Y gets voxels ``s`` times smaller there, its first centre moved accordingly."""
        old = np.asarray(self.voxels.shape, dtype=np.float64)
        new = np.asarray(np.shape(voxels), dtype=np.float64)
        if new.shape != (3,) or (new < 1).any():
            raise ValueError(f"voxels must be (X, Y, Z), got shape {np.shape(voxels)}")
        step = old / new  # old voxels per new voxel, per axis
        to_old = np.eye(4)
        to_old[:3, :3] = np.diag(step)
        to_old[:3, 3] = (step - 1.0) / 2.0
        return replace(self, voxels=voxels, affine=self.affine @ to_old)

    def cropped(self, start: tuple[int, int, int], shape: tuple[int, int, int]) -> ScanImage:
        """The box of ``shape`` voxels starting at voxel ``start``, with the affine moved to its first voxel."""
        index = tuple(slice(s, s + n) for s, n in zip(start, shape, strict=True))
        shift = np.eye(4)
        shift[:3, 3] = start
        return replace(self, voxels=self.voxels[index], affine=self.affine @ shift)

    def centre_cropped(self, shape: tuple[int, ...]) -> ScanImage:
        """The centred box of ``shape`` voxels (the first ``(n - m) // 2`` voxels of each axis dropped, as
        :mod:`client.degrade` crops axes to a multiple of the scale)."""
        start = tuple((n - m) // 2 for n, m in zip(self.voxels.shape, shape, strict=True))
        return self.cropped(start, tuple(shape))  # type: ignore[arg-type]

    def in_scanner_units(self) -> np.ndarray:
        """The voxels mapped back to scanner units (HU for CT), float32."""
        return self.normalisation.invert(self.voxels)
