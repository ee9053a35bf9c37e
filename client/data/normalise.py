"""Per-modality intensity normalisation to [0, 1], stored so that outputs can be mapped back.

CT: a fixed Hounsfield window (default -160..240 HU, soft tissue and brain). MR: robust percentiles of the
scan's foreground (voxels > 0), since MR units are arbitrary and differ per scanner and scan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from client.data.errors import ScanError
from client.data.volume import Volume

KINDS = ("ct-window", "mr-percentile")


@dataclass(frozen=True)
class Normalisation:
    """Linear map of scanner units [lo, hi] onto [0, 1]; ``kind`` says how lo and hi were chosen."""

    kind: str
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"normalisation kind must be one of {KINDS}, got {self.kind!r}")
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


def fit_normalisation(
    volume: Volume,
    ct_window: tuple[float, float] = (-160.0, 240.0),
    mr_percentiles: tuple[float, float] = (0.5, 99.5),
) -> Normalisation:
    """Choose [lo, hi] for one scan.

    CT: ``ct_window`` in HU. MR: the ``mr_percentiles`` (in %) of voxels > 0 (of all voxels when none is
    positive); when those coincide (a nearly binary image), the full min..max. Raises :class:`ScanError`
    for a constant MR volume.
    """
    if volume.modality == "CT":
        return Normalisation("ct-window", float(ct_window[0]), float(ct_window[1]))
    array = volume.array
    foreground = array[array > 0]
    values = foreground if foreground.size else array.ravel()
    lo, hi = (float(v) for v in np.percentile(values, mr_percentiles))
    if hi <= lo:
        lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        raise ScanError(volume.source, f"constant intensity ({lo:g}): nothing to normalise", "remove the scan")
    return Normalisation("mr-percentile", lo, hi)
