"""Per-modality intensity normalisation to [0, 1], stored so that outputs can be mapped back
(:class:`shared_models.image.Normalisation`, which travels with the scan to the model's output).

CT: a fixed Hounsfield window (default -160..240 HU, soft tissue and brain). MR: robust percentiles of the
scan's foreground (voxels > 0), since MR units are arbitrary and differ per scanner and scan.
"""

from __future__ import annotations

import numpy as np

from client.data.errors import ScanError
from client.data.volume import Volume
from shared_models.image import Normalisation

__all__ = ["Normalisation", "fit_normalisation"]


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
    foreground = array[array > 0]  # a copy: np.percentile may reorder it in place instead of copying it again
    if foreground.size:
        lo, hi = (float(v) for v in np.percentile(foreground, mr_percentiles, overwrite_input=True))
    else:
        lo, hi = (float(v) for v in np.percentile(array, mr_percentiles))
    if hi <= lo:
        lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        raise ScanError(volume.source, f"constant intensity ({lo:g}): nothing to normalise", "remove the scan")
    return Normalisation("mr-percentile", lo, hi)
