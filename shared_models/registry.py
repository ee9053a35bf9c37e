"""Model families by name: build from plain hyperparameters, and recover those hyperparameters from a model.

A family registers itself with ``@register_model("name", presets={...})`` on its class (or factory); the
built-in family modules are imported at the bottom of this file so that ``build_model`` always knows them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

PlainValue = bool | int | float | str | None
_SPEC_ATTR = "fedsr_spec"
_PLAIN_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class ModelFamily:
    """One registered family: its constructor, accepted keyword names with defaults, and named presets."""

    name: str
    factory: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    presets: Mapping[str, Mapping[str, PlainValue]]


MODELS: dict[str, ModelFamily] = {}


def register_model(
    name: str, *, presets: Mapping[str, Mapping[str, PlainValue]] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model class/factory under ``name``.

    Every constructor parameter must be keyword-capable with a plain default (bool/int/float/str/None), so a
    model can be rebuilt from a checkpoint's stored hyperparameters alone.
    """

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model family {name!r} is already registered")
        defaults = {}
        for param in inspect.signature(factory).parameters.values():
            if param.default is inspect.Parameter.empty or not isinstance(param.default, _PLAIN_TYPES):
                raise TypeError(f"{name}: parameter {param.name!r} needs a plain default value")
            defaults[param.name] = param.default
        for preset, values in (presets or {}).items():
            _check_known(name, values, defaults, what=f"preset {preset!r}")
        MODELS[name] = ModelFamily(name, factory, defaults, dict(presets or {}))
        return factory

    return decorate


def _check_known(name: str, params: Mapping[str, Any], defaults: Mapping[str, Any], *, what: str) -> None:
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"{name}: unknown {what} {', '.join(unknown)}; known parameters: {', '.join(sorted(defaults))}, preset"
        )
    bad = {k: v for k, v in params.items() if not isinstance(v, _PLAIN_TYPES)}
    if bad:
        raise ValueError(f"{name}: {what} values must be bool/int/float/str/None, got {bad!r}")


def build_model(name: str, **params: PlainValue) -> nn.Module:
    """Build a registered model; ``preset="tiny"|...`` supplies defaults that explicit ``params`` override.

    The fully resolved hyperparameters (family defaults <- preset <- params) are stored on the module and
    returned by :func:`model_spec`, so ``build_model(**model_spec(m))`` rebuilds the same architecture.

    Raises:
        ValueError: unknown family, preset or parameter (the message lists the known ones).
    """
    family = MODELS.get(name)
    if family is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    preset = params.pop("preset", None)
    if preset is not None and preset not in family.presets:
        raise ValueError(f"{name}: unknown preset {preset!r}; known presets: {', '.join(family.presets)}")
    _check_known(name, params, family.defaults, what="parameter(s)")
    resolved = {**family.defaults, **(family.presets[preset] if preset else {}), **params}
    model = family.factory(**resolved)
    setattr(model, _SPEC_ATTR, {"name": name, "params": resolved})
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model built by :func:`build_model` inside wrappers (Opacus ``GradSampleModule._module``,
    ``DistributedDataParallel.module``); the model itself if it is not wrapped."""
    while not hasattr(model, _SPEC_ATTR):
        inner = getattr(model, "_module", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(f"{type(model).__name__} was not built by shared_models.registry.build_model")
        model = inner
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"name": family, "params": resolved hyperparameters}`` of a model built by :func:`build_model`."""
    spec = getattr(unwrap(model), _SPEC_ATTR)
    return {"name": spec["name"], "params": dict(spec["params"])}


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# Built-in families register themselves on import (kept last: they import register_model from here).
for _module in ("shared_models.edsr", "shared_models.srcnn", "shared_models.swinir", "shared_models.gan",
                "shared_models.smore"):
    importlib.import_module(_module)
