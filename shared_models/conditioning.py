"""Scanner-aware SR: one feature map of a network modulated by the site's acquisition description (FiLM).

The description is four numbers, each in its unit, normalised by a fixed scale to about [0, 1]
(:data:`ACQUISITION_FIELDS`): field strength (T), slice thickness (mm), reconstruction-kernel sharpness (0 smooth ..
1 sharp) and noise level (std in normalised intensity). A site builds it from its ``site.toml`` profile or its DICOM
headers (``client.acquisition``); ``fedsr infer`` can set it from a plain dict (:func:`set_acquisition`).

FiLM (Perez et al., 2018, "FiLM: Visual Reasoning with a General Conditioning Layer"): a small MLP of the vector gives
a per-channel scale ``gamma`` and shift ``beta``, and the feature map ``F`` becomes ``F * (1 + gamma) + beta``. The
MLP's last layer starts at zero, so a conditioned model starts as exactly the blind one. Each family declares which
module's output is modulated (``register_model(conditioned="body")``); :func:`attach_conditioning` adds the FiLM
beside that module (``acquisition_film.*`` weights, which travel like every shared weight) and a forward hook on it.
The vector is not a weight: it is set at each site before the model is trained or scored, never saved or sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

#: The attribute name of the FiLM module, beside the modulated one (its weights are ``...acquisition_film.*``).
FILM_NAME = "acquisition_film"
#: Width of the FiLM MLP's hidden layer.
FILM_HIDDEN = 32
#: Normalised values are clipped to [0, MAX_NORMALISED] (a 7 T scanner is 2.33 x 3 T: clipped to 2).
MAX_NORMALISED = 2.0


@dataclass(frozen=True)
class AcquisitionField:
    """One number of the acquisition description: its key, unit, the scale that maps it to about [0, 1]."""

    name: str
    unit: str
    scale: float
    meaning: str


#: The acquisition description, in vector order.
ACQUISITION_FIELDS = (
    AcquisitionField("field_strength_t", "T", 3.0, "main magnetic field; 0 for CT"),
    AcquisitionField("slice_thickness_mm", "mm", 5.0, "slice thickness of the acquisition"),
    AcquisitionField("kernel_sharpness", "0..1", 1.0,
                     "reconstruction kernel: 0 smooth .. 1 sharp (k-space band kept x window, or 1/(1+PSF FWHM))"),
    AcquisitionField("noise_level", "intensity std", 0.05, "noise std in normalised [0, 1] intensity units"),
)


def acquisition_vector(description: Mapping[str, float]) -> torch.Tensor:
    """The normalised vector of a description: float32 (len(ACQUISITION_FIELDS),), each value / its scale, clipped
    to [0, MAX_NORMALISED].

    Raises:
        ValueError: a key missing or unknown, or a value that is not a finite number >= 0 (the message names it).
    """
    names = [f.name for f in ACQUISITION_FIELDS]
    missing, unknown = sorted(set(names) - set(description)), sorted(set(description) - set(names))
    if missing or unknown:
        raise ValueError(f"acquisition description: missing {missing}, unknown {unknown}; it needs exactly "
                         f"{', '.join(names)}")
    values = []
    for f in ACQUISITION_FIELDS:
        value = description[f.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"acquisition description: {f.name} must be a finite number >= 0 ({f.unit}), "
                             f"got {value!r}")
        values.append(min(float(value) / f.scale, MAX_NORMALISED))
    return torch.tensor(values, dtype=torch.float32)


class AcquisitionFiLM(nn.Module):
    """Per-channel scale and shift of a (B, C, *spatial) feature map from the acquisition vector.

    ``vector``: the site's normalised description (:func:`acquisition_vector`), set by :func:`set_acquisition`; a plain
    attribute, not a buffer, so it is neither in the state_dict (it never travels) nor a buffer Opacus would refuse.
    ``feature``: the path of the modulated module in the family's model (for the report).
    """

    def __init__(self, channels: int, feature: str, hidden: int = FILM_HIDDEN) -> None:
        super().__init__()
        self.channels, self.feature = channels, feature
        self.mlp = nn.Sequential(nn.Linear(len(ACQUISITION_FIELDS), hidden), nn.ReLU(), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.vector: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> same shape, ``features * (1 + gamma) + beta``."""
        if self.vector is None:
            raise RuntimeError(
                "this model is conditioned on the acquisition (condition = acquisition) and has no description set: "
                "call shared_models.conditioning.set_acquisition(model, {"
                + ", ".join(f"'{f.name}': ..." for f in ACQUISITION_FIELDS) + "}) first"
            )
        batch = features.shape[0]
        # one row per sample (not one shared row): per-sample gradients (Opacus) need the batch axis
        vector = self.vector.to(features.device, torch.float32).expand(batch, -1)
        gamma, beta = self.mlp(vector).to(features.dtype).chunk(2, dim=1)
        shape = (batch, self.channels) + (1,) * (features.ndim - 2)
        return features * (1 + gamma.reshape(shape)) + beta.reshape(shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, feature={self.feature!r}"


class _Modulate:
    """The forward hook on the modulated module: its output through the FiLM. An object (not a closure) so that a
    deep copy of the model modulates with the copy's FiLM."""

    def __init__(self, film: AcquisitionFiLM) -> None:
        self.film = film

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.film(output)


def attach_conditioning(model: nn.Module, feature: str) -> AcquisitionFiLM:
    """Condition ``model`` on the acquisition: a FiLM of the output of its sub-module ``feature`` (a dotted path,
    e.g. ``"body"`` or ``"generator.body"``), whose channel count is the out_channels of the last convolution inside
    it. The FiLM is registered beside that module (``<parent>.acquisition_film``). Returns the FiLM.

    Raises:
        ValueError: no such sub-module, or no convolution in it to tell its channels.
    """
    try:
        target = model.get_submodule(feature)
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no sub-module {feature!r} to condition") from err
    convs = [m for m in target.modules() if isinstance(m, _ConvNd)]
    if not convs:
        raise ValueError(f"{type(model).__name__}.{feature} has no convolution: its output channels are unknown")
    parent_path, _, _ = feature.rpartition(".")
    film = AcquisitionFiLM(convs[-1].out_channels, feature)
    model.get_submodule(parent_path).add_module(FILM_NAME, film)
    target.register_forward_hook(_Modulate(film))
    return film


def films(model: nn.Module) -> list[AcquisitionFiLM]:
    """Every FiLM in ``model`` (empty for a blind model)."""
    return [m for m in model.modules() if isinstance(m, AcquisitionFiLM)]


def set_acquisition(model: nn.Module, description: Mapping[str, float]) -> torch.Tensor:
    """Set the acquisition ``description`` (``{field: value in its unit}``, :data:`ACQUISITION_FIELDS`) on a
    conditioned model (wrappers included: every FiLM inside); returns the normalised vector.

    Raises:
        ValueError: the model is not conditioned, or the description is incomplete or out of range.
    """
    found = films(model)
    if not found:
        raise ValueError(f"{type(model).__name__} is not conditioned on the acquisition (built without "
                         "condition = acquisition)")
    vector = acquisition_vector(description)
    for film in found:
        film.vector = vector
    return vector


def conditioning_summary(model: nn.Module) -> dict | None:
    """What the report says of a conditioned model (None for a blind one): the modulated feature map, the FiLM's
    parameter count and the description's fields with units and scales."""
    found = films(model)
    if not found:
        return None
    return {
        "condition": "acquisition",
        "method": "FiLM: per-channel scale and shift of one feature map from an MLP of the acquisition vector, "
                  "initialised to the identity (the conditioned model starts as the blind one)",
        "feature_maps": [film.feature for film in found],
        "film_parameters": sum(p.numel() for film in found for p in film.parameters()),
        "fields": [{"name": f.name, "unit": f.unit, "scale": f.scale, "meaning": f.meaning}
                   for f in ACQUISITION_FIELDS],
        "sources": "each site's site.toml [acquisition] profile and scanner name; its DICOM headers "
                   "(MagneticFieldStrength, SliceThickness, ConvolutionKernel) where the profile says nothing or "
                   "site.toml declares none; explicit defaults for the rest",
    }
