"""One federated model: rounds of the run's strategy over the sites of one part of the run, checkpointed every round.

A run trains the federation of every site (``global``) or, for unseen-scanner tests, a federation without one site
(``holdout:SITE``); both go through :func:`train_federated`, which only ever talks to the sites of its
:class:`server.sites.SiteGrid`. A resumed run's federation goes on after the last round its checkpoint holds, with
the strategy's state as it was then (``server.strategy_state``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from server.checkpoint import RoundState, write_global
from server.run_log import RunRecorder
from server.settings import RunSettings
from server.sites import SiteGrid
from server.strategies import SiteStrategy

log = logging.getLogger(__name__)


def train_federated(
    grid: SiteGrid,
    settings: RunSettings,
    model: nn.Module,
    initial: ArrayRecord,
    recorder: RunRecorder,
    *,
    experiment: str,
    round_zero: bool,
    checkpoint: str,
    resumed: RoundState | None = None,
) -> ArrayRecord:
    """``num-rounds`` rounds of the run's strategy (:meth:`SiteStrategy.for_run`) among ``grid``'s sites, starting
    from ``initial``; returns the final weights.

    ``round_zero``: first score the initial weights at those sites (round 0). ``checkpoint``: where to keep the
    latest round's weights and the strategy's state (relative to the run folder). ``resumed``: the last round a
    stopped run completed; the rounds after it go on from its weights and strategy state, numbered as they were to
    be.
    """
    done = resumed.round if resumed else 0
    arrays = resumed.arrays(model, settings.family_options) if resumed else initial
    if resumed:
        log.info("%s: going on after round %d of %d (%s)", experiment, done, settings.num_rounds, resumed.path)
    if done >= settings.num_rounds:
        return arrays
    strategy = SiteStrategy.for_run(settings, grid, recorder=recorder, reference=arrays, experiment=experiment)
    if resumed:
        strategy.restore(resumed.strategy)
    config = ConfigRecord(settings.round_config())
    if round_zero and not resumed:
        config["server-round"] = 0
        strategy.round_zero(grid, arrays, config, settings.round_timeout)

    def keep(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if local_round > 0:
            write_global(recorder.run_dir, model, arrays, settings=settings, normalisation=recorder.normalisation,
                         name=checkpoint, round_=done + local_round, experiment=experiment,
                         strategy_state=strategy.state())
        return None

    result = (ResumedRounds(strategy, done) if done else strategy).start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=settings.num_rounds - done,
        timeout=settings.round_timeout,
        train_config=config,
        evaluate_config=config,
        evaluate_fn=keep,
    )
    return result.arrays


class ResumedRounds(Strategy):
    """``strategy``'s rounds after round ``completed``. Flower's ``Strategy.start`` numbers the rounds it runs from
    1; this passes ``completed`` + that number on, so the sites get the true ``server-round`` in their config (their
    seeds depend on it) and the run record the true round."""

    def __init__(self, strategy: Strategy, completed: int) -> None:
        self.strategy = strategy
        self.completed = completed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.completed, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.completed, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.completed, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.completed, replies)

    def summary(self) -> None:
        self.strategy.summary()
