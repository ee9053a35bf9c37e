"""The contract between the ClientApp and a local task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from client.pairs import PreparedSite


@dataclass(frozen=True)
class RoundJob:
    """One round's instructions from the coordinator (the ConfigRecord, typed).

    ``patch_size``: HR patch side (pixels). ``extra``: every key the base fields do not cover (family options
    such as GAN settings), as sent.
    """

    model: str
    model_params: dict[str, Any]
    scale: int
    server_round: int
    local_steps: int
    batch_size: int
    patch_size: int
    learning_rate: float
    loss: str
    seed: int
    eval_max_slices: int
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: ConfigRecord, device: torch.device) -> "RoundJob":
        import json

        known = {
            "model", "model-params", "scale", "server-round", "local-steps", "batch-size", "patch-size",
            "learning-rate", "loss", "seed", "eval-max-slices", "device",
        }
        return cls(
            model=str(config["model"]),
            model_params=json.loads(str(config["model-params"])),
            scale=int(config["scale"]),
            server_round=int(config.get("server-round", 0)),
            local_steps=int(config["local-steps"]),
            batch_size=int(config["batch-size"]),
            patch_size=int(config["patch-size"]),
            learning_rate=float(config["learning-rate"]),
            loss=str(config["loss"]),
            seed=int(config["seed"]),
            eval_max_slices=int(config["eval-max-slices"]),
            device=device,
            extra={k: v for k, v in config.items() if k not in known},
        )


@dataclass(frozen=True)
class TrainResult:
    """What a local training call sends back: the weights that leave the site and scalar metrics."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float | int]


class LocalTask(ABC):
    """A family's local procedure: how a site prepares its data, trains and evaluates."""

    @abstractmethod
    def prepare(self, site_dir: str, job: RoundJob) -> PreparedSite:
        """The site's pairs for this task (cached per process by the implementation)."""

    def load_global(
        self, model: nn.Module, weights: dict[str, torch.Tensor], state: RecordDict, site: PreparedSite
    ) -> None:
        """Put the coordinator's weights into the freshly built model (all of its keys by default)."""
        model.load_state_dict(weights)

    @abstractmethod
    def train(self, model: nn.Module, site: PreparedSite, job: RoundJob, state: RecordDict) -> TrainResult:
        """Local training from the global weights; returns what leaves the site."""

    @abstractmethod
    def evaluate(self, model: nn.Module, site: PreparedSite, job: RoundJob) -> dict[str, float]:
        """Scores on the site's validation scans (keys of client.evaluation.METRIC_KEYS + num_val_*)."""
