"""A PNG per scan for a quick look: the input, the interpolation and the SR output side by side, one plane, one
window, true proportions.

The plane is the middle axial slice, or, for a model that adds slices only (through-plane), the middle coronal
plane (X, Z), where its new slices show. Its rows are collected while the output streams past, so no whole output
is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from client.inference.staging import StagedOutput

_UP = {False: 1, True: 2}  # world axis shown upwards: anterior in an axial plane, superior in a coronal one


class PreviewPlanes:
    """Collects one plane of the interpolation and of the SR output (scanner units) from the output's slabs.

    ``volume``: the input (X, Y, Z), scanner units; ``affine``: its voxel -> world (RAS+); ``shape``: the output's
    (X', Y', Z'); ``coronal``: show the plane (X, Z) at the middle Y instead of the middle axial slice.
    """

    def __init__(self, volume: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], coronal: bool) -> None:
        self.coronal, self.shape = coronal, shape
        across = 1 if coronal else 2  # the axis the plane cuts
        self._middle = shape[across] // 2
        source = int((self._middle + 0.5) * volume.shape[across] / shape[across])
        self.input = volume[:, source, :] if coronal else volume[:, :, source]
        size = (shape[0], shape[2]) if coronal else shape[:2]
        self.interpolated = np.zeros(size, dtype=np.float32)
        self.sr = np.zeros(size, dtype=np.float32)
        axis = 2 if coronal else 1  # the array axis drawn vertically
        self._extent = [0.0, float(np.linalg.norm(affine[:3, 0]) * volume.shape[0]),
                        0.0, float(np.linalg.norm(affine[:3, axis]) * volume.shape[axis])]
        self._origin = "lower" if affine[_UP[coronal], axis] >= 0 else "upper"

    def add(self, z0: int, interpolated: np.ndarray, sr: np.ndarray) -> None:
        """Take this plane's part of output slices ``z0 ..`` (each (X', Y', n))."""
        n = sr.shape[2]
        if self.coronal:
            self.interpolated[:, z0 : z0 + n] = interpolated[:, self._middle, :]
            self.sr[:, z0 : z0 + n] = sr[:, self._middle, :]
        elif z0 <= self._middle < z0 + n:
            self.interpolated[:] = interpolated[:, :, self._middle - z0]
            self.sr[:] = sr[:, :, self._middle - z0]

    def save(self, path: Path, window: tuple[float, float], title: str) -> Path:
        """Write the three panels to ``path`` (PNG, atomically), grey levels ``window`` (scanner units)."""
        panels = (("input", self.input), ("interpolation", self.interpolated), ("SR", self.sr))
        figure = Figure(figsize=(12, 4.6), layout="constrained")  # drawn by Agg directly: no pyplot state
        FigureCanvasAgg(figure)
        for ax, (name, plane) in zip(figure.subplots(1, 3), panels):
            ax.imshow(plane.T, cmap="gray", vmin=window[0], vmax=window[1], extent=self._extent, origin=self._origin,
                      interpolation="nearest")
            ax.set_title(f"{name} {plane.shape[0]}x{plane.shape[1]}")
            ax.set_axis_off()
        figure.suptitle(f"{title}\nwindow {window[0]:g}..{window[1]:g}", fontsize=9)
        with StagedOutput(path, folder=False, overwrite=True) as staged:
            figure.savefig(staged.temp, format="png", dpi=110)
            return staged.commit()
