"""Run settings: one typed object for every key of `[tool.flwr.app.config]` in pyproject.toml.

The ServerApp reads them from `context.run_config` (``flwr run``); ``fedsr simulate`` builds them from its
flags. Keys are kebab-case in the run config and snake_case here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class RunSettings:
    """Everything that shapes a federated run.

    Sizes are in pixels, times in seconds. ``patch_size`` is the side of a high-resolution training patch;
    the low-resolution patch is ``patch_size // scale``.
    """

    num_rounds: int = 5
    num_sites: int = 3
    min_sites: int = 2
    local_steps: int = 40
    batch_size: int = 16
    patch_size: int = 48
    learning_rate: float = 1e-3
    loss: str = "l1"
    model: str = "edsr"
    model_preset: str = "tiny"
    spatial_dims: int = 2
    scale: int = 2
    device: str = "auto"
    seed: int = 0
    evaluate_round_zero: bool = True
    eval_max_slices: int = 48
    node_wait_seconds: float = 120.0
    round_timeout: float = 3600.0
    run_dir: str = ""
    sites_dir: str = ""
    gan_discriminator: str = "federated"
    gan_warmup_rounds: int = 1
    gan_adversarial_weight: float = 0.005

    def __post_init__(self) -> None:
        problems = []
        if self.num_rounds < 1:
            problems.append("num-rounds must be >= 1")
        if self.num_sites < 1:
            problems.append("num-sites must be >= 1")
        if self.min_sites < 1:
            problems.append("min-sites must be >= 1")
        if self.local_steps < 1 or self.batch_size < 1:
            problems.append("local-steps and batch-size must be >= 1")
        if self.spatial_dims not in (2, 3):
            problems.append(f"spatial-dims must be 2 or 3, got {self.spatial_dims}")
        if self.scale not in (2, 4):
            problems.append(f"scale must be 2 or 4, got {self.scale}")
        if self.patch_size % self.scale or self.patch_size // self.scale < 8:
            problems.append(f"patch-size {self.patch_size} must be a multiple of scale {self.scale} and >= 8*scale")
        if self.learning_rate <= 0:
            problems.append("learning-rate must be > 0")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.gan_discriminator not in ("federated", "local"):
            problems.append(f"gan-discriminator must be federated or local, got {self.gan_discriminator!r}")
        if problems:
            raise ValueError("invalid run settings: " + "; ".join(problems))

    @property
    def required_sites(self) -> int:
        """Sites that must reply in every round for the run to go on (never more than the federation has)."""
        return min(self.min_sites, self.num_sites)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunSettings":
        """Build from a Flower run config (kebab-case keys); unknown keys are an error, missing keys default."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; known keys: {sorted(known)}")
        values = {}
        for key, value in run_config.items():
            field = known[key]
            values[field.name] = _coerce(key, value, type(field.default))
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping ``flwr run --run-config`` and ``config.toml`` use."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "RunSettings":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a TOML value to the field's type, with an error that names the key."""
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
