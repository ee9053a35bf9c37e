"""The contract between the ClientApp and a family's local task, and the site's typed view of a round."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.pairs import PreparedSite
from client.state import site_state_dir
from shared_models.registry import family
from shared_models.settings import FamilyOptions, SiteSettings


@dataclass(frozen=True)
class RoundJob(SiteSettings):
    """One round's instructions at a site: the :class:`SiteSettings` the coordinator sent, typed and checked, plus
    the round number, the Flower run's id (the privacy ledger names it), the family's options, the torch device the
    site resolved and the SuperNode's node config (``state-dir``, ``device``, ``site-dir``: the site's own, never
    the coordinator's).

    ``purpose``: which model the job trains, "" for the federated one, else a baseline's name (``local-baseline``,
    ``pooled``): state a family keeps between rounds (a local discriminator) is kept apart per purpose."""

    server_round: int = 0
    run_id: int = 0
    purpose: str = ""
    options: FamilyOptions | None = None
    torch_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node_config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], torch_device: torch.device, node_config: Mapping[str, Any] | None = None,
        run_id: int = 0,
    ) -> RoundJob:
        """Parse a round config (a ``ConfigRecord`` or any mapping) sent by the coordinator.

        Raises ValueError for an unknown family or a value of the wrong type; the message names the key.
        """
        options_type = family(str(config.get("model", cls.model))).options
        return cls.parse(
            config,
            server_round=int(config.get("server-round", 0)),
            run_id=run_id,
            options=options_type.parse(config) if options_type is not None else None,
            torch_device=torch_device,
            node_config=dict(node_config or {}),
        )


    def state_folder(self, site_dir: Path) -> Path:
        """The site's state folder for this job's purpose (created on first use; see client.state)."""
        folder = site_state_dir(self.node_config, site_dir) / self.purpose
        folder.mkdir(exist_ok=True)
        return folder


@dataclass(frozen=True)
class TrainResult:
    """What a local training call sends back: the weights that leave the site and scalar metrics."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float | int]


class LocalTask(ABC):
    """A family's local procedure at a site: prepare its data, train from the global weights, evaluate them."""

    @abstractmethod
    def prepare(self, site_dir: str, job: RoundJob) -> PreparedSite:
        """The site's pairs for this task (cached per process by the implementation)."""

    @abstractmethod
    def train(self, model: nn.Module, weights: dict[str, torch.Tensor], site: PreparedSite, job: RoundJob) -> TrainResult:
        """Local training from the coordinator's ``weights``; returns what leaves the site."""

    @abstractmethod
    def train_alone(
        self, model: nn.Module, weights: dict[str, torch.Tensor], site: PreparedSite, job: RoundJob, rounds: int
    ) -> TrainResult:
        """A baseline: ``rounds`` rounds of local training from ``weights`` with nothing averaged in between."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, weights: dict[str, torch.Tensor], site: PreparedSite, job: RoundJob
    ) -> dict[str, float]:
        """Scores of the coordinator's ``weights`` on the site's validation pairs (client.evaluation's keys)."""
