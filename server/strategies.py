"""Aggregation strategies: Flower's FedAvg, made aware of sites, update checks, deadlines and the run record."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.run_log import RunRecorder
from server.sites import FederationError, SiteGrid, site_about, site_name
from server.updates import update_problem

log = logging.getLogger(__name__)

#: Seconds between two looks at which sites are connected while a round waits for the missing ones.
POLL_SECONDS = 0.2
#: The record of a site's reply that says it refuses the request (``category``, ``reason``; ``client.policy``).
REFUSAL = "refusal"


def note_refusal(reply: Message, recorder: RunRecorder, server_round: int, experiment: str) -> bool:
    """Whether ``reply`` is a site's refusal. A refusal is logged (WARNING: the site, the request, the category and
    the reason the site gave) and recorded in ``metrics.jsonl`` (:meth:`RunRecorder.record_refusal`) as part of
    ``experiment``'s ``server_round``; the caller then treats the site as absent for that request."""
    if reply.has_error() or REFUSAL not in reply.content.config_records:
        return False
    refusal = reply.content.config_records[REFUSAL]
    site, request = site_name(reply), reply.metadata.message_type
    category, reason = str(refusal.get("category", "")), str(refusal.get("reason", ""))
    log.warning("round %d %s: site %s refused (%s): %s", server_round, request, site, category, reason)
    recorder.record_refusal(server_round, request, site, category, reason, experiment)
    return True


class SiteFedAvg(FedAvg):
    """FedAvg that samples sites with a deadline, records each site's numbers, drops unusable updates and stops
    below ``required_sites``.

    ``reference`` is the global model's ArrayRecord; every train reply is checked against the newest global
    weights (keys, shapes, float dtype, finite values, positive num-examples) before aggregation.

    Sampling (:meth:`sample_sites`) replaces Flower's ``sample_nodes``, which waits with no deadline until
    ``min_*_nodes`` nodes are online: one SuperNode gone for good would stop the run forever. Here each round
    waits at most ``node_wait_seconds`` for the grid's missing sites, then goes on with the connected ones when
    there are at least ``required_sites`` of them, and otherwise raises :class:`FederationError`. Every
    connected site of the grid is sampled, in site-name order (no random draw: a run is reproducible).
    """

    def __init__(
        self, *, recorder: RunRecorder, reference: ArrayRecord, required_sites: int, experiment: str,
        node_wait_seconds: float, **kwargs,
    ) -> None:
        # Flower's minimums are only shown in its start-up summary here; sample_sites enforces required_sites.
        minimums = dict.fromkeys(("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"), required_sites)
        super().__init__(**minimums, **kwargs)
        self.recorder = recorder
        self.experiment = experiment
        self.reference = reference
        self.required_sites = required_sites
        self.node_wait_seconds = node_wait_seconds
        self.absent: set[int] = set()
        """Node ids of the sites the last sampling went on without: not waited for again until they are back."""
        self._sent: list[tuple[Message, str]] = []  # the last messages sent, each with its site's name

    # ------------------------------------------------------------------------------------------------ sampling
    def sample_sites(self, grid: SiteGrid, server_round: int, phase: str) -> list[int]:
        """The node ids of the grid's sites that take part in this ``phase`` (train/evaluate) of ``server_round``.

        Waits until every site of ``grid`` is connected, at most ``node_wait_seconds`` (sites already missing at
        the previous sampling are not waited for again: a site gone for good costs one wait, not one per round).
        A site that is connected again is sampled again. Returns the connected sites in site-name order.

        Raises:
            FederationError: fewer than ``required_sites`` sites connected by the deadline; names the missing ones.
        """
        deadline = time.monotonic() + self.node_wait_seconds
        while True:
            connected = set(grid.get_node_ids())
            awaited = set(grid.sites) - self.absent
            enough = len(connected) >= self.required_sites
            remaining = deadline - time.monotonic()
            if (enough and awaited <= connected) or remaining <= 0:
                break
            time.sleep(min(POLL_SECONDS, remaining))
        missing = sorted(grid.sites[node].name for node in set(grid.sites) - connected)
        if not enough:
            raise FederationError(
                f"round {server_round} {phase}: only {len(connected)} of {len(grid.sites)} sites are connected after "
                f"waiting {self.node_wait_seconds:g} s (node-wait-seconds), {self.required_sites} required "
                f"(min-sites); missing: {', '.join(missing)}. Start the SuperNodes of the missing sites, or run with "
                "a lower min-sites"
            )
        for node in sorted(self.absent & connected):
            log.info("round %d %s: site %s is connected again and takes part", server_round, phase,
                     grid.sites[node].name)
        if missing:
            log.warning("round %d %s: going on with %d of %d sites; not connected: %s (start their SuperNodes to "
                        "have them rejoin)", server_round, phase, len(connected), len(grid.sites), ", ".join(missing))
        self.absent = set(grid.sites) - connected
        return sorted(connected, key=lambda node: grid.sites[node].name)

    def configure_train(  # type: ignore[override]  # sampling needs the site names of a SiteGrid
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: SiteGrid
    ) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, MessageType.TRAIN)

    def configure_evaluate(  # type: ignore[override]
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: SiteGrid
    ) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: SiteGrid,
                  message_type: str) -> list[Message]:
        """FedAvg's messages (weights + config with ``server-round``) to the sites :meth:`sample_sites` picks."""
        nodes = self.sample_sites(grid, server_round, message_type)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self._sent = [(Message(content=record, message_type=message_type, dst_node_id=node), grid.sites[node].name)
                      for node in nodes]
        return [msg for msg, _site in self._sent]

    def _usable(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[Message]:
        """The replies to aggregate, in site-name order; the others are logged with their site's name, and a
        site's refusal is also recorded (:func:`note_refusal`): the site is absent from the round, as a missing one.

        Raises:
            FederationError: fewer than ``required_sites`` usable replies; names the sites without one.
        """
        # A reply names its site, but the error reply the SuperLink makes for a node that went offline does not:
        # it is named by the message it answers (the grid sets message ids on the messages it pushes).
        answered = {msg.metadata.message_id: site for msg, site in self._sent if msg.metadata.message_id}
        sampled = {site for _msg, site in self._sent}
        usable, unheard = [], set(sampled)
        for msg in replies:
            site = answered.get(msg.metadata.reply_to_message_id) or site_name(msg)
            unheard.discard(site)
            if msg.has_error():
                log.error("round %d %s: site %s failed: %s", server_round, phase, site, msg.error.reason)
                continue
            if note_refusal(msg, self.recorder, server_round, self.experiment):
                continue
            problem = update_problem(msg.content, self.reference) if phase == "train" else None
            if problem:
                log.error("round %d: update from site %s rejected: %s", server_round, site, problem)
                continue
            usable.append(msg)
        for site in sorted(unheard):
            log.error("round %d %s: no reply from site %s within round-timeout", server_round, phase, site)
        usable.sort(key=site_name)  # a fixed summation order: the aggregate does not depend on arrival order
        if len(usable) < self.required_sites:
            without = sorted(sampled - {site_name(msg) for msg in usable})
            raise FederationError(
                f"round {server_round} {phase}: only {len(usable)} of {len(self._sent)} site(s) replied usably, "
                f"{self.required_sites} required (min-sites); no usable reply from: {', '.join(without)} (see the "
                "errors and refusals above). Check that their SuperNodes run (a restarted one rejoins) and that the "
                "run's settings are within their site.toml [policy], or run with a lower min-sites"
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

    def round_zero(self, grid: SiteGrid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> None:
        """Score the initial global model at every connected site (recorded as round 0), sampled as every round."""
        replies = grid.send_and_receive(self.configure_evaluate(0, arrays, config, grid), timeout=timeout)
        self.aggregate_evaluate(0, replies)
