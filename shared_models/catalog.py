"""The model zoo at a glance: one row per registered family and preset (for ``fedsr models``)."""

from __future__ import annotations

from typing import Any

from shared_models.registry import build_model, count_parameters, families, supported_dims


def model_catalog() -> list[dict[str, Any]]:
    """Rows ``{"family", "preset", "spatial_dims", "params_2d_x2"}``, families sorted by name, presets in their
    declared order (``preset`` None for a family without presets).

    ``spatial_dims``: the dims the family supports, e.g. [2, 3]. ``params_2d_x2``: parameter count of that preset
    for one input channel, scale 2, in 2D (in 3D for a 3D-only family); parameters the family does not have
    (``in_channels``, ``scale``) are left at its defaults.
    """
    rows = []
    for family, entry in sorted(families().items()):
        defaults = entry.defaults
        for preset in list(entry.presets) or [None]:
            dims = list(supported_dims(family, preset))
            params: dict[str, Any] = {} if preset is None else {"preset": preset}
            if "in_channels" in defaults:
                params["in_channels"] = 1
            if "scale" in defaults:
                params["scale"] = 2
            if "spatial_dims" in defaults and dims:
                params["spatial_dims"] = 2 if 2 in dims else dims[0]
            rows.append(
                {
                    "family": family,
                    "preset": preset,
                    "spatial_dims": dims,
                    "params_2d_x2": count_parameters(build_model(family, **params)),
                }
            )
    return rows
