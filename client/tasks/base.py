"""The contract between the ClientApp and a family's local task, and the site's typed view of a round."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.pairs import PreparedSite
from client.state import site_state_dir
from client.training import ProximalTerm
from shared_models.registry import family, family_of, unwrap
from shared_models.settings import FamilyOptions, SiteSettings, coerce


#: The train-config key of FedProx's mu (the name Flower's FedProx strategy uses).
PROXIMAL_MU_KEY = "proximal-mu"


@dataclass(frozen=True)
class RoundJob(SiteSettings):
    """One round's instructions at a site: the :class:`SiteSettings` the coordinator sent, typed and checked, plus
    the round number, the Flower run's id (the privacy ledger names it), the family's options, the torch device the
    site resolved and the SuperNode's node config (``state-dir``, ``device``, ``site-dir``: the site's own, never
    the coordinator's).

    ``purpose``: which model the job trains, "" for the federated one, else a baseline's name (``local-baseline``,
    ``pooled``): state a family keeps between rounds (a local discriminator) is kept apart per purpose.

    ``proximal_mu``: FedProx's mu, read from the train config's ``proximal-mu`` (which Flower's FedProx strategy
    adds; absent: 0.0, plain local training); see :meth:`proximal`."""

    server_round: int = 0
    run_id: int = 0
    purpose: str = ""
    options: FamilyOptions | None = None
    torch_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node_config: Mapping[str, Any] = field(default_factory=dict)
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"{PROXIMAL_MU_KEY} must be a finite number >= 0, got {self.proximal_mu!r}")

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
            proximal_mu=float(coerce(PROXIMAL_MU_KEY, config.get(PROXIMAL_MU_KEY, 0.0), float)),
        )

    def proximal(self, model: nn.Module, within: nn.Module | None = None) -> ProximalTerm | None:
        """FedProx's term for this round over the weights of ``model`` that travel (its family's ``shared_state``),
        those of its part ``within`` only when given, at their values now: call it after the coordinator's weights
        are loaded. None (nothing to compute) when ``proximal_mu`` is 0 or no such weight is trainable."""
        if self.proximal_mu == 0:
            return None
        root = unwrap(model)
        travelling = family_of(root).shared_state(root, self.options).keys()
        return ProximalTerm.over(root, travelling, self.proximal_mu, self.torch_device, within)

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
