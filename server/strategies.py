"""Aggregation: any of Flower's strategies, wrapped by fedsr's sampling, reply validation and run record.

:class:`SiteStrategy` is a Flower ``Strategy`` that holds another one, ``inner``: Flower's FedAvg, FedProx, FedAdam,
FedYogi, FedMedian, FedTrimmedAvg or Krum (:func:`flower_strategy`, from ``strategy`` and its settings), inside
Flower's central-DP wrapper with ``dp = "central"``. In every round the wrapper

1. samples the sites (:class:`SiteSampler`: a deadline instead of Flower's endless wait, ``fraction-train`` /
   ``fraction-evaluate`` drawn reproducibly, site-name order);
2. lets ``inner`` build the round's messages for exactly those sites (:class:`SampledSites`), so whatever the
   strategy adds goes out: FedProx's ``proximal-mu`` in the train config, the clipping norm of client-side DP,
   FedAdam/FedYogi remembering the weights they sent; with ``transfer-dtype = "float16"`` the weights then travel
   as float16 (``inner`` keeps the float32 ones);
3. checks every reply (``server.updates``: records, keys, shapes, dtype, finite values, num-examples, metric keys,
   and the norm rule across the round); errors, refusals and rejected replies leave the site out of the round, and
   the round goes on while ``required_sites`` usable replies remain;
4. records the usable replies and hands them, in site-name order, to ``inner`` to aggregate; an aggregate with NaN
   or Inf is rejected (rule ``aggregate``): the global weights and ``inner``'s state stay those of the round before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from server.central_dp import with_central_dp
from server.run_log import RunRecorder
from server.settings import RunSettings
from server.sites import FederationError, GridView, SiteGrid, SiteInfo, site_about, site_name
from server.strategy_state import lasting_state, plain_state, restore_state, state_from_plain
from server.updates import (
    Rejection, ReplyRules, all_finite, evaluate_rejection, norm_rejections, train_rejection, update_distances,
)

log = logging.getLogger(__name__)

#: Seconds between two looks at which sites are connected while a round waits for the missing ones.
POLL_SECONDS = 0.2
#: The record of a site's reply that says it refuses the request (``category``, ``reason``; ``client.policy``).
REFUSAL = "refusal"
#: The record key of the weights in messages and replies (Flower's default ``arrayrecord_key``; the sites read it).
ARRAYS = "arrays"
#: The phases a round samples sites for, in the order that seeds their draws.
PHASES = (MessageType.TRAIN, MessageType.EVALUATE)


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


def note_rejection(recorder: RunRecorder, server_round: int, request: str, site: str, rejection: Rejection,
                   experiment: str) -> None:
    """Log (ERROR: the site, the round, the rule and the reason) and record (a ``rejected`` row,
    :meth:`RunRecorder.record_rejection`) a reply to ``request`` that is not used, or with ``site`` ``*`` the round's
    aggregate."""
    what = "the aggregate" if site == "*" else f"reply of site {site}"
    log.error("round %d %s: %s rejected (rule %s): %s", server_round, request, what, rejection.rule, rejection.reason)
    recorder.record_rejection(server_round, request, site, rejection.rule, rejection.reason, experiment)


def flower_strategy(settings: RunSettings, required_sites: int) -> FedAvg:
    """Flower's strategy that ``strategy`` names, with its settings (``proximal-mu``, ``server-lr``, ...).

    Its minimums are ``required_sites``: Flower only shows them in its start-up summary here, since the strategy
    only ever sees the sites :class:`SiteSampler` picked, at least that many (Flower's own sampling, which would
    wait for them without a deadline, then finds them all there). The client learning rate FedAdam/FedYogi log
    (``eta_l``) is the run's ``learning-rate``; Flower's server optimisers do not use it.
    """
    optimiser = {"eta": settings.server_learning_rate, "eta_l": settings.learning_rate,
                 "beta_1": settings.server_beta1, "beta_2": settings.server_beta2, "tau": settings.server_tau}
    kinds: dict[str, tuple[type[FedAvg], dict[str, Any]]] = {
        "fedavg": (FedAvg, {}),
        "fedprox": (FedProx, {"proximal_mu": settings.proximal_mu}),
        "fedadam": (FedAdam, optimiser),
        "fedyogi": (FedYogi, optimiser),
        "fedmedian": (FedMedian, {}),
        "fedtrimmedavg": (FedTrimmedAvg, {"beta": settings.trim_fraction}),
        "krum": (Krum, {"num_malicious_nodes": settings.krum_byzantine}),
    }
    kind, options = kinds[settings.strategy]
    return kind(min_train_nodes=required_sites, min_evaluate_nodes=required_sites,
                min_available_nodes=required_sites, arrayrecord_key=ARRAYS, **options)


def strategy_warnings(settings: RunSettings, sites: int) -> list[str]:
    """What the run's robust strategy cannot do with ``sites`` sites per round (it still runs)."""
    warnings = []
    if settings.strategy == "fedtrimmedavg" and int(settings.trim_fraction * sites) == 0:
        warnings.append(f"fedtrimmedavg with trim-fraction {settings.trim_fraction:g} trims nothing from {sites} "
                        f"sites (it averages them): set trim-fraction to at least {1 / sites:.3g}")
    if settings.strategy == "krum" and sites <= 2 * settings.krum_byzantine + 2:
        warnings.append(f"krum tolerates {settings.krum_byzantine} bad site(s) only with more than "
                        f"{2 * settings.krum_byzantine + 2} sites per round, this run has {sites}")
    return warnings


def sample_size(fraction: float, connected: int, required: int) -> int:
    """How many of ``connected`` sites a phase samples: ``round(fraction * connected)``, at least ``required``, at
    most every connected site."""
    return min(connected, max(required, round(fraction * connected)))


class SiteSampler:
    """Which sites take part in each phase of each round, never waiting without a deadline.

    Flower's ``sample_nodes`` waits with no deadline until ``min_*_nodes`` nodes are online: one SuperNode gone for
    good would stop the run forever. Here each round waits at most ``node_wait_seconds`` for the grid's missing
    sites, then goes on with the connected ones when there are at least ``required_sites`` of them, and otherwise
    raises :class:`FederationError`. Of the connected sites, in site-name order, a phase takes every one, or with
    ``fractions[phase]`` < 1 (``fraction-train``, ``fraction-evaluate``) :func:`sample_size` of them drawn with a
    generator seeded by (``seed``, round, phase): a run is reproducible and a resumed run draws as the stopped one
    would have.
    """

    def __init__(self, required_sites: int, node_wait_seconds: float, fractions: Mapping[str, float] | None = None,
                 seed: int = 0) -> None:
        self.required_sites = required_sites
        self.node_wait_seconds = node_wait_seconds
        self.fractions = dict(fractions or {})
        self.seed = seed
        self.absent: set[int] = set()
        """Node ids of the sites the last sampling went on without: not waited for again until they are back."""

    def sample(self, grid: SiteGrid, server_round: int, phase: str) -> list[int]:
        """The node ids of the grid's sites that take part in this ``phase`` (train/evaluate) of ``server_round``,
        in site-name order.

        Waits until every site of ``grid`` is connected, at most ``node_wait_seconds`` (sites already missing at
        the previous sampling are not waited for again: a site gone for good costs one wait, not one per round).
        A site that is connected again is sampled again.

        Raises:
            FederationError: fewer than ``required_sites`` sites connected by the deadline; names the missing ones.
        """
        connected = self._connected(grid, server_round, phase)
        count = sample_size(self.fractions.get(phase, 1.0), len(connected), self.required_sites)
        if count == len(connected):
            return connected
        draw = np.random.default_rng([self.seed % 2**32, server_round, PHASES.index(phase)])
        chosen = [connected[index] for index in sorted(draw.choice(len(connected), size=count, replace=False))]
        log.info("round %d %s: %d of %d connected sites sampled (fraction-%s %g): %s", server_round, phase, count,
                 len(connected), phase, self.fractions[phase], ", ".join(grid.sites[node].name for node in chosen))
        return chosen

    def _connected(self, grid: SiteGrid, server_round: int, phase: str) -> list[int]:
        """The connected sites of ``grid`` once every one is there or the deadline has passed (see :meth:`sample`)."""
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


class SampledSites(GridView):
    """What the inner Flower strategy sees of a round: exactly the sites :class:`SiteSampler` picked, all of them
    "connected", so that Flower's own sampling takes every one at once (a site that went away since is answered
    for by the SuperLink with an error reply). Flower's strategies only sample with it; anything else goes to the
    run's grid."""

    def __init__(self, grid: SiteGrid, nodes: Sequence[int]) -> None:
        super().__init__(grid)
        self._nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)


class SiteStrategy(Strategy):
    """Flower's strategy ``inner`` (None: FedAvg) with sites sampled on a deadline, every reply checked, each
    site's numbers recorded, and a stop below ``required_sites`` usable replies (see the module doc).

    ``reference``: the global weights every train reply is checked against (the newest aggregate after each
    round). ``rules``: what a reply may hold (``server.updates.ReplyRules``). ``fractions`` and ``seed``: the
    sampling (:class:`SiteSampler`).
    """

    def __init__(
        self, inner: Strategy | None = None, *, recorder: RunRecorder, reference: ArrayRecord, required_sites: int,
        experiment: str, node_wait_seconds: float, rules: ReplyRules | None = None,
        fractions: Mapping[str, float] | None = None, seed: int = 0,
    ) -> None:
        self.inner = inner if inner is not None else FedAvg(
            min_train_nodes=required_sites, min_evaluate_nodes=required_sites, min_available_nodes=required_sites)
        self.recorder = recorder
        self.experiment = experiment
        self.reference = reference
        self.required_sites = required_sites
        self.rules = rules or ReplyRules()
        self.sampler = SiteSampler(required_sites, node_wait_seconds, fractions, seed)
        self._sent: list[tuple[Message, SiteInfo]] = []  # the last messages sent, each with its site

    @classmethod
    def for_run(cls, settings: RunSettings, grid: SiteGrid, *, recorder: RunRecorder, reference: ArrayRecord,
                experiment: str) -> SiteStrategy:
        """The strategy ``settings`` describe for a federation of ``grid``'s sites: :func:`flower_strategy`, in
        Flower's central-DP wrapper with ``dp = "central"`` (its noise set for the sites a round samples), with the
        run's reply rules and sampling."""
        required = min(settings.min_sites, len(grid.sites))
        sampled = sample_size(settings.fraction_train, len(grid.sites), required)
        for warning in strategy_warnings(settings, sampled):
            log.warning("%s: %s", experiment, warning)
        inner: Strategy = flower_strategy(settings, required)
        if settings.dp == "central":
            inner = with_central_dp(inner, settings, sampled)
        return cls(inner, recorder=recorder, reference=reference, required_sites=required, experiment=experiment,
                   node_wait_seconds=settings.node_wait_seconds, rules=ReplyRules.from_settings(settings),
                   fractions={MessageType.TRAIN: settings.fraction_train,
                              MessageType.EVALUATE: settings.fraction_evaluate},
                   seed=settings.seed)

    # ------------------------------------------------------------------------------------------- lasting state
    def state(self) -> dict[str, dict[str, Any]]:
        """What ``inner`` carries to the next round, as plain values for the round checkpoint
        (``server.strategy_state``)."""
        return plain_state(lasting_state(self.inner))

    def restore(self, plain: Mapping[str, Mapping[str, Any]]) -> None:
        """Go on from a checkpoint's :meth:`state`."""
        restore_state(self.inner, state_from_plain(plain))

    # ------------------------------------------------------------------------------------------------ messages
    def sample_sites(self, grid: SiteGrid, server_round: int, phase: str) -> list[int]:
        """The node ids of the sites that take part in ``phase`` of ``server_round`` (:meth:`SiteSampler.sample`)."""
        return self.sampler.sample(grid, server_round, phase)

    def configure_train(  # type: ignore[override]  # sampling needs the site names of a SiteGrid
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: SiteGrid
    ) -> Iterable[Message]:
        nodes = self.sample_sites(grid, server_round, MessageType.TRAIN)
        return self._sending(grid, self.inner.configure_train(server_round, arrays, config, SampledSites(grid, nodes)))

    def configure_evaluate(  # type: ignore[override]
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: SiteGrid
    ) -> Iterable[Message]:
        nodes = self.sample_sites(grid, server_round, MessageType.EVALUATE)
        return self._sending(grid, self.inner.configure_evaluate(server_round, arrays, config,
                                                                 SampledSites(grid, nodes)))

    def _sending(self, grid: SiteGrid, messages: Iterable[Message]) -> list[Message]:
        """``inner``'s messages in site-name order, their weights in the run's ``transfer-dtype``; remembered with
        their sites, to name the replies."""
        sent = sorted(((msg, grid.sites[msg.metadata.dst_node_id]) for msg in messages), key=lambda pair: pair[1].name)
        if self.rules.transfer_dtype == "float16":
            cast: set[int] = set()  # Flower's strategies give every message the same content: cast it once
            for msg, _site in sent:
                if id(msg.content) not in cast and ARRAYS in msg.content.array_records:
                    msg.content[ARRAYS] = as_float16(msg.content[ARRAYS])
                    cast.add(id(msg.content))
        self._sent = sent
        return [msg for msg, _site in sent]

    # ------------------------------------------------------------------------------------------------- replies
    def _usable(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[tuple[SiteInfo, Message]]:
        """The replies to aggregate with their sites, in site-name order. A site's error is logged, its refusal
        logged and recorded (:func:`note_refusal`), a reply that breaks a rule of ``server.updates`` rejected
        (:meth:`_reject`): in each case the site is absent from the round, as a missing one.

        Raises:
            FederationError: fewer than ``required_sites`` usable replies; names the sites without one.
        """
        # A reply comes from the node its message went to, but the error reply the SuperLink makes for a node that
        # went offline may not say so: it is named by the message it answers (the grid sets message ids on push).
        answered = {msg.metadata.message_id: site for msg, site in self._sent if msg.metadata.message_id}
        by_node = {site.node_id: site for _msg, site in self._sent}
        unheard = {site.name for _msg, site in self._sent}
        asked = set(unheard)
        checked: list[tuple[SiteInfo, Message]] = []
        for msg in replies:
            site = answered.get(msg.metadata.reply_to_message_id) or by_node.get(msg.metadata.src_node_id) \
                or SiteInfo(msg.metadata.src_node_id, site_name(msg), {})
            unheard.discard(site.name)
            asked.add(site.name)
            if msg.has_error():
                log.error("round %d %s: site %s failed: %s", server_round, phase, site.name, msg.error.reason)
                continue
            if note_refusal(msg, self.recorder, server_round, self.experiment):
                continue
            rejection = (train_rejection(msg.content, self.reference, self.rules, site.about.get("train_examples"))
                         if phase == MessageType.TRAIN else evaluate_rejection(msg.content, self.rules))
            if rejection:
                self._reject(server_round, phase, site.name, rejection)
                continue
            checked.append((site, msg))
        for name in sorted(unheard):
            log.error("round %d %s: no reply from site %s within round-timeout", server_round, phase, name)
        if phase == MessageType.TRAIN:
            checked = self._within_norm(server_round, checked)
        checked.sort(key=lambda pair: pair[0].name)  # a fixed order: the aggregate does not depend on arrival order
        if len(checked) < self.required_sites:
            without = sorted(asked - {site.name for site, _msg in checked})
            raise FederationError(
                f"round {server_round} {phase}: only {len(checked)} of {len(asked)} site(s) replied usably, "
                f"{self.required_sites} required (min-sites); no usable reply from: {', '.join(without)} (see the "
                "errors, refusals and rejections above). Check that their SuperNodes run (a restarted one rejoins) "
                "and that the run's settings are within their site.toml [policy], or run with a lower min-sites"
            )
        return checked

    def _within_norm(self, server_round: int, checked: list[tuple[SiteInfo, Message]]
                     ) -> list[tuple[SiteInfo, Message]]:
        """The train replies the ``norm`` rule keeps (``server.updates.norm_rejections``); the others rejected."""
        if not self.rules.norm_limit or len(checked) < 2:
            return checked
        weights = [next(iter(msg.content.array_records.values())) for _site, msg in checked]
        verdicts = norm_rejections(update_distances(weights, self.reference), self.rules.norm_limit)
        for (site, _msg), rejection in zip(checked, verdicts, strict=True):
            if rejection:
                self._reject(server_round, MessageType.TRAIN, site.name, rejection)
        return [pair for pair, rejection in zip(checked, verdicts, strict=True) if rejection is None]

    def _reject(self, server_round: int, request: str, site: str, rejection: Rejection) -> None:
        note_rejection(self.recorder, server_round, request, site, rejection, self.experiment)

    def _record(self, server_round: int, phase: str, usable: list[tuple[SiteInfo, Message]]) -> list[Message]:
        """Record each usable reply's metrics as its site's row; returns the replies."""
        for site, msg in usable:
            metrics = next(iter(msg.content.metric_records.values()))
            self.recorder.record(server_round, phase, site.name, dict(metrics), site_about(msg), self.experiment)
        return [msg for _site, msg in usable]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = self._record(server_round, MessageType.TRAIN, self._usable(server_round, MessageType.TRAIN, replies))
        before = lasting_state(self.inner)
        arrays, metrics = self.inner.aggregate_train(server_round, usable)
        if arrays is None:
            return None, metrics
        if not all_finite(arrays):
            self._reject(server_round, MessageType.TRAIN, "*", Rejection(
                "aggregate", f"the aggregate of {len(usable)} replies contains NaN or Inf; the global weights stay "
                             f"those after round {server_round - 1}"))
            restore_state(self.inner, before)
            return None, metrics
        self.reference = in_dtypes_of(self.reference, arrays)
        return self.reference, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        usable = self._usable(server_round, MessageType.EVALUATE, replies)
        return self.inner.aggregate_evaluate(server_round, self._record(server_round, MessageType.EVALUATE, usable))

    def summary(self) -> None:
        fractions = ", ".join(f"{phase} {fraction:g}" for phase, fraction in self.sampler.fractions.items())
        log.info("fedsr: at least %d site(s) per round, sampled fractions: %s; replies checked with "
                 "update-norm-limit %g, max-num-examples %g, transfer-dtype %s", self.required_sites,
                 fractions or "all", self.rules.norm_limit, self.rules.max_num_examples, self.rules.transfer_dtype)
        self.inner.summary()

    def round_zero(self, grid: SiteGrid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> None:
        """Score the initial global model at the sites (recorded as round 0), sampled as every round."""
        replies = grid.send_and_receive(self.configure_evaluate(0, arrays, config, grid), timeout=timeout)
        self.aggregate_evaluate(0, replies)


def in_dtypes_of(reference: ArrayRecord, arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with each array in the dtype of ``reference``'s (the global model's float32: Flower's FedAdam and
    FedYogi return their step in float64)."""
    return ArrayRecord({key: value if value.dtype == reference[key].dtype else
                        Array(value.numpy().astype(reference[key].dtype)) for key, value in arrays.items()})


def as_float16(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with every float32 array as float16 (``transfer-dtype = "float16"``); others as they are."""
    return ArrayRecord({key: Array(value.numpy().astype(np.float16)) if value.dtype == "float32" else value
                        for key, value in arrays.items()})
