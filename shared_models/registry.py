"""Model families as plugins: one registry entry bundles everything that is particular to a family.

A family registers itself with ``@register_model("name", presets={...}, ...)`` on its class (or factory). The entry
holds its architecture (the factory and its presets), its options (a :class:`~shared_models.settings.FamilyOptions`
dataclass, namespaced ``name.option``), its local task at a site (``"module:Class"`` of a
``client.tasks.LocalTask``, which makes the site's training pairs and interpolation baseline and trains), how it is
applied to a whole volume, which weights travel between the sites and the coordinator, and what a run exports.
Generic code (server, evaluation, inference, CLI) asks the entry and never names a family.

Two model options apply to every family that declares where (:data:`MODEL_OPTIONS`, from the run settings
``personal`` and ``condition``): ``personal="head"`` keeps the family's reconstruction ``head`` at the sites (its
weights never travel: ``shared_state`` leaves them out), ``condition="acquisition"`` modulates the output of its
``conditioned`` module with the site's acquisition description (:mod:`shared_models.conditioning`). Both are part
of the model's spec, so a checkpoint rebuilds them.

The built-in families are imported on first use (:func:`families`). Other packages add families through the entry-point
group ``fedsr.families`` (``[project.entry-points."fedsr.families"] name = "package.module"``): the module is imported,
and its ``register_model`` calls register it, on the coordinator and at every site alike.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared_models.conditioning import attach_conditioning

if TYPE_CHECKING:
    import numpy as np

    from shared_models.settings import FamilyOptions, SiteSettings

log = logging.getLogger(__name__)

PlainValue = bool | int | float | str | None
_SPEC_ATTR = "fedsr_spec"
_PLAIN_TYPES = (bool, int, float, str, type(None))
#: Entry-point group through which installed packages add model families.
ENTRY_POINT_GROUP = "fedsr.families"
#: The family a run trains when none is named (the ``model`` setting's default).
DEFAULT_MODEL = "edsr"
#: The local task of a family that names none: paired supervised SR (``client.tasks.supervised``).
SUPERVISED_TASK = "client.tasks.supervised:SupervisedTask"
#: Options every family takes in ``build_model`` besides its own hyperparameters (the run settings of the same
#: names, ``shared_models.settings.PERSONAL`` / ``CONDITIONS``), with their "off" value; in a model's spec only when on.
MODEL_OPTIONS = {"personal": "none", "condition": "none"}

#: ``shared_state(model, options) -> {key: tensor}``: the weights that travel between a site and the coordinator.
SharedState = Callable[[nn.Module, "FamilyOptions | None"], dict[str, torch.Tensor]]
#: ``apply(model, lr_volume, device=..., batch_size=...) -> sr_volume``: a family's own whole-volume inference.
VolumeApply = Callable[..., "np.ndarray"]


def whole_state(model: nn.Module, options: FamilyOptions | None = None) -> dict[str, torch.Tensor]:
    """Every key of the model's state: what travels for a family that keeps nothing at the sites."""
    return {k: v.detach() for k, v in unwrap(model).state_dict().items()}


def as_is(model: nn.Module) -> nn.Module:
    """The model itself: what a run exports for a family that trains exactly what it applies."""
    return model


@dataclass(frozen=True)
class ModelFamily:
    """One registered family.

    Attributes:
        name: the family's name (``--model``).
        factory: builds the network from keyword hyperparameters (all with plain defaults).
        defaults: the factory's keyword names and default values.
        presets: named sets of hyperparameters (``tiny``, ``small``, ``base``).
        options: the family's run options (``FamilyOptions`` subclass), or None.
        task: ``"module:Class"`` of the site's local procedure (a ``client.tasks.LocalTask``).
        shared_state: the weights that travel (default: all of them).
        export: the model a finished run delivers and scores (default: the trained model itself).
        apply: the family's own whole-volume inference; None = slice by slice (2D) or in tiles (3D).
        head: the reconstruction head, as module paths (state_dict key prefixes, e.g. ``("upsample", "tail")``):
            what stays at each site with ``personal = "head"``; empty = the family cannot be personalised.
        conditioned: the module whose output (B, C, *spatial) is modulated with ``condition = "acquisition"``;
            None = the family cannot be conditioned.
        train_metrics: the metric keys its task adds to every train reply beside ``shared_models.replies``'
            (the coordinator rejects a reply with a key missing or one more).
    """

    name: str
    factory: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    presets: Mapping[str, Mapping[str, PlainValue]]
    options: type[FamilyOptions] | None = None
    task: str = SUPERVISED_TASK
    shared_state: SharedState = whole_state
    export: Callable[[nn.Module], nn.Module] = as_is
    apply: VolumeApply | None = None
    head: tuple[str, ...] = ()
    conditioned: str | None = None
    train_metrics: tuple[str, ...] = ()


#: Every registered family by name, filled on first use (:func:`families`).
MODELS: dict[str, ModelFamily] = {}
#: The built-in families' modules (each registers itself when imported).
BUILTIN_FAMILIES = ("shared_models.edsr", "shared_models.srcnn", "shared_models.swinir", "shared_models.gan",
                    "shared_models.smore")
_loaded = False


def families() -> dict[str, ModelFamily]:
    """Every registered family by name: the built-in ones and those of installed plugins, imported on first use
    (so that importing this module, e.g. for a site's data check, does not import every network)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_FAMILIES:
            importlib.import_module(module)
        load_installed_families()
    return MODELS


def register_model(
    name: str,
    *,
    presets: Mapping[str, Mapping[str, PlainValue]] | None = None,
    options: type[FamilyOptions] | None = None,
    task: str = SUPERVISED_TASK,
    shared_state: SharedState = whole_state,
    export: Callable[[nn.Module], nn.Module] = as_is,
    apply: VolumeApply | None = None,
    head: tuple[str, ...] = (),
    conditioned: str | None = None,
    train_metrics: tuple[str, ...] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model class/factory as the family ``name`` (see :class:`ModelFamily`).

    Every constructor parameter must be keyword-capable with a plain default (bool/int/float/str/None), so a
    model can be rebuilt from a checkpoint's stored hyperparameters alone; none may be named like a
    :data:`MODEL_OPTIONS` key. ``options.namespace`` must be ``"name."``. ``shared_state`` is kept as given, and
    the entry's ``shared_state`` leaves a personal head out of it (:func:`personal_keys`).
    """
    if options is not None and options.namespace != f"{name}.":
        raise ValueError(f"{name}: options {options.__name__} must have namespace = {name + '.'!r}")

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model family {name!r} is already registered")
        defaults = {}
        for param in inspect.signature(factory).parameters.values():
            if param.default is inspect.Parameter.empty or not isinstance(param.default, _PLAIN_TYPES):
                raise TypeError(f"{name}: parameter {param.name!r} needs a plain default value")
            defaults[param.name] = param.default
        taken = sorted(set(defaults) & set(MODEL_OPTIONS))
        if taken:
            raise TypeError(f"{name}: parameter(s) {', '.join(taken)} are model options every family takes; rename")
        for preset, values in (presets or {}).items():
            _check_known(name, values, defaults, what=f"preset {preset!r}")
        MODELS[name] = ModelFamily(
            name, factory, defaults, dict(presets or {}), options=options, task=task,
            shared_state=_without_personal(shared_state), export=export, apply=apply, head=tuple(head),
            conditioned=conditioned, train_metrics=tuple(train_metrics),
        )
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
    """Build a registered model; ``preset="tiny"|...`` supplies defaults that explicit ``params`` override;
    ``personal`` and ``condition`` (:data:`MODEL_OPTIONS`) personalise or condition it (module docstring).

    The fully resolved hyperparameters (family defaults <- preset <- params, plus the model options that are on)
    are stored on the module and returned by :func:`model_spec`, so ``build_model(**model_spec(m))`` rebuilds the
    same architecture. The family's own weights are drawn first: a conditioned model's are those of the blind one.

    Raises:
        ValueError: unknown family, preset, parameter or option value (the message lists the known ones), or an
            option the family does not declare.
    """
    family = families().get(name)
    if family is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(families()))}")
    preset = params.pop("preset", None)
    if preset is not None and preset not in family.presets:
        raise ValueError(f"{name}: unknown preset {preset!r}; known presets: {', '.join(family.presets)}")
    options = {key: params.pop(key, off) for key, off in MODEL_OPTIONS.items()}
    problems = option_problems(name, **options)
    if problems:
        raise ValueError("; ".join(problems))
    _check_known(name, params, family.defaults, what="parameter(s)")
    resolved = {**family.defaults, **(family.presets[preset] if preset else {}), **params}
    model = family.factory(**resolved)
    if options["condition"] == "acquisition":
        attach_conditioning(model, family.conditioned)
    on = {key: value for key, value in options.items() if value != MODEL_OPTIONS[key]}
    setattr(model, _SPEC_ATTR, {"name": name, "params": {**resolved, **on}})
    return model


def option_problems(name: str, personal: str = "none", condition: str = "none") -> list[str]:
    """Why the family ``name`` cannot be built with these model options (empty when it can, or when there is no
    such family: :func:`model_problems` says so)."""
    from shared_models.settings import CONDITIONS, PERSONAL  # settings imports this module

    problems = [f"{key} must be one of {', '.join(choices)}, got {value!r}"
                for key, value, choices in (("personal", personal, PERSONAL), ("condition", condition, CONDITIONS))
                if value not in choices]
    if problems or (personal, condition) == ("none", "none"):
        return problems
    found = families().get(name)
    if found is not None and personal == "head" and not found.head:
        problems.append(f"model {name!r} declares no reconstruction head (register_model(head=...)): it cannot "
                        "run with personal = head")
    if found is not None and condition == "acquisition" and found.conditioned is None:
        problems.append(f"model {name!r} declares no feature map to condition (register_model(conditioned=...)): "
                        "it cannot run with condition = acquisition")
    return problems


def personal_keys(model: nn.Module) -> frozenset[str]:
    """The state_dict keys that stay at each site: the family's head when the model was built with
    ``personal="head"``, none otherwise."""
    model = unwrap(model)
    spec = model_spec(model)
    if spec["params"].get("personal", "none") == "none":
        return frozenset()
    prefixes = family(spec["name"]).head
    return frozenset(k for k in model.state_dict() if any(k == p or k.startswith(p + ".") for p in prefixes))


def load_shared_state(model: nn.Module, weights: Mapping[str, torch.Tensor], options: FamilyOptions | None) -> None:
    """Load ``weights`` into ``model``: exactly the keys its family's ``shared_state`` sends with ``options`` (a
    personal head and weights a family keeps at the sites are left as they are); shapes are checked.

    Raises:
        ValueError: keys missing or unexpected (the first few named).
    """
    expected = set(family_of(model).shared_state(model, options))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    unwrap(model).load_state_dict(dict(weights), strict=False)


def _without_personal(shared_state: SharedState) -> SharedState:
    """``shared_state`` without the model's personal keys (:func:`personal_keys`)."""

    @functools.wraps(shared_state)
    def travelling(model: nn.Module, options: FamilyOptions | None = None) -> dict[str, torch.Tensor]:
        personal = personal_keys(model)
        return {k: v for k, v in shared_state(model, options).items() if k not in personal}

    return travelling


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


def family(name: str) -> ModelFamily:
    """The registered family ``name``; ValueError listing the known ones otherwise."""
    known = families()
    if name not in known:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(known))}")
    return known[name]


def family_of(model: nn.Module) -> ModelFamily:
    """The family a model built by :func:`build_model` belongs to."""
    return family(model_spec(model)["name"])


def family_options_types() -> dict[str, type[FamilyOptions]]:
    """``{family: options class}`` of every family that declares options."""
    return {name: f.options for name, f in sorted(families().items()) if f.options is not None}


@functools.cache
def supported_dims(name: str, preset: str | None = None) -> tuple[int, ...]:
    """Spatial dims the family accepts (2 for a family whose factory has no ``spatial_dims``): the constructor is
    asked, so the family's own checks decide. Cached: settings are checked against it every time they are made."""
    found = family(name)
    if "spatial_dims" not in found.defaults:
        return (2,)
    preset_arg = {} if preset is None else {"preset": preset}
    dims = []
    for d in (2, 3):
        try:
            build_model(name, **preset_arg, spatial_dims=d)
        except ValueError:
            continue
        dims.append(d)
    return tuple(dims)


def model_problems(name: str, preset: str, spatial_dims: int) -> list[str]:
    """Why ``model`` / ``model-preset`` / ``spatial-dims`` cannot be built together (empty when they can)."""
    known = families()
    if name not in known:
        return [f"unknown model {name!r}; known models: {', '.join(sorted(known))}"]
    presets = known[name].presets
    if presets and preset not in presets:
        return [f"model {name!r} has no preset {preset!r}; known presets: {', '.join(presets)}"]
    dims = supported_dims(name, preset if presets else None)
    if spatial_dims not in dims:
        return [f"model {name!r} supports spatial-dims {' or '.join(map(str, dims))}, not {spatial_dims}"]
    return []


def build_from_settings(settings: SiteSettings) -> nn.Module:
    """The model the run settings name (``model``, ``model-preset``, ``scale``, ``spatial-dims``, and the model
    options ``personal`` and ``condition``), built the same way by the coordinator and by every site. Seeded with
    ``settings.seed``: the initial weights are part of a reproducible run."""
    found = family(settings.model)
    params: dict[str, PlainValue] = {"preset": settings.model_preset} if found.presets else {}
    params.update({key: getattr(settings, key) for key in MODEL_OPTIONS})
    if "scale" in found.defaults:
        params["scale"] = settings.scale
    if "spatial_dims" in found.defaults:
        params["spatial_dims"] = settings.spatial_dims
    torch.manual_seed(settings.seed)
    return build_model(settings.model, **params)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_installed_families() -> None:
    """Import the modules that installed packages declare in the ``fedsr.families`` entry-point group (done on first
    use; call again after installing one into a running process). A module already imported is not imported
    again; a broken plugin is logged and skipped (the built-in families still work)."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:  # a third-party module may raise anything on import
            log.error("model family plugin %s (%s) could not be loaded: %s", entry.name, entry.value, err)

