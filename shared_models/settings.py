"""Run settings, declared once as dataclass fields; every other form of them is derived from these declarations.

A setting is a field made with :func:`setting` (default, help, allowed values, an optional command-line flag). From
the declarations come:

- the defaults of pyproject's ``[tool.flwr.app.config]`` (a test checks that the table equals
  ``RunSettings().to_config()``), i.e. the keys ``flwr run --run-config "k=v"`` accepts;
- the options of ``fedsr simulate`` (fields with a ``flag``; every key through ``--run-config``);
- the round config the coordinator sends: the fields of :class:`SiteSettings` (and the chosen family's options)
  travel to the sites, the fields ``server.settings.RunSettings`` adds stay with the coordinator;
- the site's typed view of a round, ``client.tasks.RoundJob``, parsed from that round config.

Keys are kebab-case in configs (``local-steps``) and snake_case in Python (``local_steps``). A model family declares
its own options as a :class:`FamilyOptions` dataclass; they live under the family's name (``family.option``,
a nested TOML table that Flower flattens with a dot) and are checked where they are declared.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from shared_models.registry import DEFAULT_MODEL, option_problems

#: ``dp`` choices: no differential privacy, DP-SGD at every site (client/privacy.py), or central DP on the
#: sites' updates with Flower's DP strategy wrappers (server/central_dp.py).
DP_MODES = ("none", "local", "central")
#: ``dp-clipping`` choices (central DP): where each site's update is clipped, and with a fixed or adaptive norm.
DP_CLIPPING = ("server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
#: ``dp-unit`` choices: whose data one unit of the guarantee protects.
DP_UNITS = ("patient", "patch")
#: Logged with every patch-level DP round and shown in the report: what the weaker unit means.
PATCH_UNIT_WARNING = ("dp-unit is 'patch': the guarantee covers one image tile, not a patient; a patient's "
                      "other tiles are not protected by it")

#: ``transfer-dtype`` choices: how weights travel between the sites and the coordinator (aggregated in float32).
TRANSFER_DTYPES = ("float32", "float16")
#: ``personal`` choices: nothing personal, or each site keeps its own reconstruction head (FedPer-style).
PERSONAL = ("none", "head")
#: ``condition`` choices: one blind mapping, or a network conditioned on the site's acquisition description.
CONDITIONS = ("none", "acquisition")

PlainValue = bool | int | float | str
S = TypeVar("S", bound="Settings")


def setting(
    default: PlainValue,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[PlainValue, ...] | None = None,
    minimum: float | None = None,
    positive: bool = False,
) -> Any:
    """Declare one run setting (a dataclass field).

    Args:
        default: the value that works when nobody sets it (bool, int, float or str).
        help: one line for ``--help`` and the docs; state units (pixels, seconds, mm).
        flag: the ``fedsr simulate`` option (e.g. ``"--rounds"``); None = reachable through ``--run-config`` only.
        choices: the allowed values, if the setting is an enumeration.
        minimum: smallest allowed value (numbers).
        positive: the value must be > 0 (numbers).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "minimum": minimum, "positive": positive}
    return field(default=default, metadata={"setting": meta})


@dataclass(frozen=True)
class Declared:
    """One declared setting as the derived forms need it. ``key``: kebab-case; ``name``: the field name."""

    key: str
    name: str
    kind: type
    default: PlainValue
    help: str
    flag: str | None
    choices: tuple[PlainValue, ...] | None
    minimum: float | None
    positive: bool


class Settings:
    """Base of every settings dataclass: declaration listing, parsing from a config, checks, export."""

    #: Prefix of every key in configs (a family's name plus a dot for :class:`FamilyOptions`; empty otherwise).
    namespace: ClassVar[str] = ""

    @classmethod
    @functools.cache
    def declared(cls) -> tuple[Declared, ...]:
        """The settings of this class in declaration order (fields made with :func:`setting` only)."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            meta = f.metadata.get("setting")
            if meta is None:
                continue
            key = cls.namespace + f.name.replace("_", "-")
            out.append(Declared(key, f.name, hints[f.name], f.default, **meta))
        return tuple(out)

    @classmethod
    def parse(cls: type[S], config: Mapping[str, Any], **extra: Any) -> S:
        """Build from a config mapping (keys with this class's namespace); missing keys take their defaults.

        ``extra`` sets fields that are not settings (e.g. the round number of a site's job). Keys of ``config``
        that this class does not declare are ignored here; :func:`unknown_keys` finds them.

        Raises:
            ValueError: a value of the wrong type or outside its allowed values; the message names the key.
        """
        values = {d.name: coerce(d.key, config[d.key], d.kind) for d in cls.declared() if d.key in config}
        return cls(**values, **extra)

    def to_config(self) -> dict[str, PlainValue]:
        """``{key: value}`` of every declared setting (kebab-case keys with the namespace)."""
        return {d.key: getattr(self, d.name) for d in self.declared()}

    def __post_init__(self) -> None:
        problems = [p for d in self.declared() if (p := _violation(d, getattr(self, d.name)))]
        problems += self.problems()
        if problems:
            scope = f"{self.namespace.rstrip('.')} options" if self.namespace else "run settings"
            raise ValueError(f"invalid {scope}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Checks across settings (override); each problem names the keys involved."""
        return []

    def replace(self: S, **changes: Any) -> S:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _violation(declared: Declared, value: Any) -> str | None:
    if declared.choices is not None and value not in declared.choices:
        return f"{declared.key} must be one of {', '.join(map(str, declared.choices))}, got {value!r}"
    if declared.minimum is not None and value < declared.minimum:
        return f"{declared.key} must be >= {declared.minimum}, got {value!r}"
    if declared.positive and not value > 0:
        return f"{declared.key} must be > 0, got {value!r}"
    return None


class FamilyOptions(Settings):
    """A model family's own options: subclass as a frozen dataclass of :func:`setting` fields and set
    ``namespace = "<family>."``. They travel to the sites with the round config when the family is used."""


def coerce(key: str, value: Any, kind: type) -> PlainValue:
    """A config value (TOML: int, float, str, bool) as the setting's type, with an error that names the key."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"run-config key {key!r} must be true or false, got {value!r}")
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"run-config key {key!r} must be {kind.__name__}, got {value!r}")
    return value


def unknown_keys(config: Mapping[str, Any], *classes: type[Settings]) -> list[str]:
    """Keys of ``config`` that none of ``classes`` declares, sorted."""
    known = {d.key for cls in classes for d in cls.declared()}
    return sorted(set(config) - known)


@dataclass(frozen=True)
class SiteSettings(Settings):
    """The settings that travel to every site with each round: what to build and how to train and score it.

    Sizes are in pixels, rates per optimiser step. ``patch_size`` is the side of a high-resolution training patch;
    the low-resolution patch is ``patch_size // scale``.
    """

    model: str = setting(DEFAULT_MODEL, "Model family (`fedsr models` lists them).", flag="--model")
    model_preset: str = setting("tiny", "Model size preset of the family (tiny, small, base).", flag="--preset")
    spatial_dims: int = setting(2, "2: slice by slice; 3: whole volumes in tiles.", flag="--spatial-dims",
                                choices=(2, 3))
    scale: int = setting(2, "Super-resolution factor.", flag="--scale", choices=(2, 4))
    num_rounds: int = setting(5, "Federated rounds (sites plan their privacy noise and check their policy with "
                              "it).", flag="--rounds", minimum=1)
    local_steps: int = setting(40, "Optimiser steps per site per round.", flag="--local-steps", minimum=1)
    batch_size: int = setting(16, "Patches per optimiser step.", flag="--batch-size", minimum=1)
    patch_size: int = setting(48, "High-resolution patch side in pixels (a multiple of the scale).",
                              flag="--patch-size")
    learning_rate: float = setting(0.001, "Adam learning rate.", flag="--learning-rate", positive=True)
    loss: str = setting("l1", "Weighted loss terms: l1, mse, charbonnier, ssim, hfen, fft, e.g. 'l1:1,ssim:0.2'.",
                        flag="--loss")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N (a site's own node config wins).",
                          flag="--device")
    seed: int = setting(0, "Seed of phantoms, initial weights, patch sampling and LR noise.", flag="--seed")
    eval_max_slices: int = setting(48, "At most this many slices with anatomy are scored per validation scan.",
                                   minimum=1)
    dp: str = setting("none", "Differential privacy: none, local (DP-SGD per patient at each site) or central "
                      "(per site, Flower's wrappers).", flag="--dp", choices=DP_MODES)
    dp_clipping: str = setting("server-fixed", "Central DP: where updates are clipped, and a fixed or adaptive "
                               "norm (from dp-clip-norm).",
                               flag="--dp-clipping", choices=DP_CLIPPING)
    dp_unit: str = setting("patient", "Local DP's unit: patient, or patch (weaker: one image tile; a warning is "
                           "recorded).",
                           flag="--dp-unit", choices=DP_UNITS)
    dp_clip_norm: float = setting(1.0, "DP: norm bound C of a unit's gradient (local) or a site's update "
                                  "(central).", flag="--dp-clip-norm",
                                  positive=True)
    dp_noise_multiplier: float = setting(0.0, "DP: noise std over C; 0: planned to spend dp-target-epsilon "
                                         "over the whole training.",
                                         flag="--dp-noise-multiplier", minimum=0)
    dp_target_epsilon: float = setting(8.0, "DP: the epsilon the whole planned training spends (noise "
                                       "planning).", flag="--dp-target-epsilon", positive=True)
    dp_patches_per_patient: int = setting(8, "DP, patient unit: patches drawn from each patient in a step (the "
                                          "expected patients per step is batch-size / this).", minimum=1)

    transfer_dtype: str = setting("float32", "Dtype of the weights sent between the sites and the coordinator; "
                                  "float16 halves the bytes (the coordinator aggregates in float32).",
                                  flag="--transfer-dtype", choices=TRANSFER_DTYPES)
    personal: str = setting("none", "Personalisation: none, or head (each site keeps its own reconstruction head "
                            "in its state folder; it never leaves the site).", flag="--personal", choices=PERSONAL)
    condition: str = setting("none", "Scanner-aware SR: none, or acquisition (the network is conditioned on the "
                             "site's acquisition description: field strength, slice thickness, kernel, noise).",
                             flag="--condition", choices=CONDITIONS)

    def problems(self) -> list[str]:
        problems = []
        if self.patch_size % self.scale or self.patch_size // self.scale < 8:
            problems.append(
                f"patch-size {self.patch_size} must be a multiple of scale {self.scale} and >= 8*scale"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.personal in PERSONAL and self.condition in CONDITIONS:  # else the choices' own problem is enough
            problems += option_problems(self.model, self.personal, self.condition)
        return problems + self._inactive_dp_settings()

    def _inactive_dp_settings(self) -> list[str]:
        """A DP setting changed for a DP mode that is off (it would do nothing: refused, with the mode it needs)."""
        modes = {"dp_clip_norm": ("local", "central"), "dp_noise_multiplier": ("local", "central"),
                 "dp_target_epsilon": ("local", "central"), "dp_clipping": ("central",), "dp_unit": ("local",),
                 "dp_patches_per_patient": ("local",)}
        defaults = {d.name: d for d in self.declared()}
        return [f"{defaults[name].key} acts only with dp = {' or '.join(map(repr, needs))}, not {self.dp!r}: set dp "
                f"or leave {defaults[name].key} out" for name, needs in modes.items()
                if self.dp not in needs and getattr(self, name) != defaults[name].default]

    def site_settings(self) -> SiteSettings:
        """Just the settings that travel to the sites (a subclass's own fields dropped)."""
        return SiteSettings.parse(self.to_config())
