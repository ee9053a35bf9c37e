"""One federated model: FedAvg rounds over the sites of one part of the run, checkpointed every round.

A run trains the federation of every site (``global``) or, for unseen-scanner tests, a federation without one site
(``holdout:SITE``); both go through :func:`train_federated`, which only ever talks to the sites of its
:class:`server.sites.SiteGrid`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from torch import nn

from server.checkpoint import write_global
from server.run_log import RunRecorder
from server.settings import RunSettings
from server.sites import SiteGrid
from server.strategies import SiteFedAvg


def train_federated(
    grid: SiteGrid,
    settings: RunSettings,
    model: nn.Module,
    initial: ArrayRecord,
    recorder: RunRecorder,
    *,
    experiment: str,
    round_zero: bool,
    checkpoint: Path | None,
) -> ArrayRecord:
    """``num-rounds`` FedAvg rounds among ``grid``'s sites, starting from ``initial``; returns the final weights.

    ``round_zero``: first score the initial weights at those sites (round 0). ``checkpoint``: where to keep the
    latest round's weights (relative to the run folder), or None.
    """
    sites = len(grid.sites)
    required = min(settings.min_sites, sites)
    strategy = SiteFedAvg(
        recorder=recorder,
        reference=initial,
        required_sites=required,
        experiment=experiment,
        min_train_nodes=sites,
        min_evaluate_nodes=sites,
        min_available_nodes=required,
    )
    config = ConfigRecord(settings.round_config())
    if round_zero:
        config["server-round"] = 0
        strategy.round_zero(grid, initial, config, settings.round_timeout)

    def keep(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0 and checkpoint is not None:
            write_global(recorder.run_dir, model, arrays, settings=settings, normalisation=recorder.normalisation,
                         name=str(checkpoint), round_=server_round)
        return None

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=settings.num_rounds,
        timeout=settings.round_timeout,
        train_config=config,
        evaluate_config=config,
        evaluate_fn=keep,
    )
    return result.arrays
