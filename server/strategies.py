"""Aggregation strategies: Flower's FedAvg, made aware of sites, update checks and the run record."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from server.run_log import RunRecorder
from server.sites import FederationError, site_about, site_name
from server.updates import update_problem

log = logging.getLogger(__name__)


class SiteFedAvg(FedAvg):
    """FedAvg that records each site's numbers, drops unusable updates and stops below ``required_sites``.

    ``reference`` is the global model's ArrayRecord; every train reply is checked against the newest global
    weights (keys, shapes, float dtype, finite values, positive num-examples) before aggregation.
    """

    def __init__(
        self, *, recorder: RunRecorder, reference: ArrayRecord, required_sites: int, experiment: str, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self.experiment = experiment
        self.reference = reference
        self.required_sites = required_sites

    def _usable(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[Message]:
        usable = []
        for msg in replies:
            site = site_name(msg)
            if msg.has_error():
                log.error("round %d %s: site %s failed: %s", server_round, phase, site, msg.error.reason)
                continue
            problem = update_problem(msg.content, self.reference) if phase == "train" else None
            if problem:
                log.error("round %d: update from site %s rejected: %s", server_round, site, problem)
                continue
            usable.append(msg)
        usable.sort(key=site_name)  # a fixed summation order: the aggregate does not depend on arrival order
        if len(usable) < self.required_sites:
            raise FederationError(
                f"round {server_round} {phase}: only {len(usable)} site(s) replied usably, "
                f"{self.required_sites} required (min-sites); see the errors above for each failing site"
            )
        return usable

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = self._usable(server_round, "train", replies)
        for msg in usable:
            self.recorder.record(server_round, "train", site_name(msg), dict(msg.content["metrics"]), site_about(msg),
                                 self.experiment)
        arrays, metrics = super().aggregate_train(server_round, usable)
        if arrays is not None:
            self.reference = arrays
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        usable = self._usable(server_round, "evaluate", replies)
        for msg in usable:
            self.recorder.record(server_round, "evaluate", site_name(msg), dict(msg.content["metrics"]),
                                 site_about(msg), self.experiment)
        return super().aggregate_evaluate(server_round, usable)

    def round_zero(self, grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> None:
        """Score the initial global model at every site (recorded as round 0), using FedAvg's own sampling."""
        replies = grid.send_and_receive(self.configure_evaluate(0, arrays, config, grid), timeout=timeout)
        self.aggregate_evaluate(0, replies)
