"""The Flower ServerApp: waits for the sites, runs FedAvg rounds, checkpoints, writes the run record.

The coordinator never reads an image: it builds the architecture, sends weights and round settings, and
receives weights and numbers.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import FINAL, LAST, write_global
from server.run_log import RunRecorder, write_run_config
from server.settings import RunSettings
from server.strategies import FederationError, SiteFedAvg
from shared_models.registry import build_from_settings, family, model_spec

log = logging.getLogger(__name__)


def build_server_app(settings: RunSettings | None = None) -> ServerApp:
    """The ServerApp. With ``settings`` (simulation) they are used as given; otherwise read from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, settings or RunSettings.from_run_config(context.run_config))

    return app


def wait_for_sites(grid: Grid, settings: RunSettings) -> list[int]:
    """Node ids of the connected sites, once all ``num-sites`` are there or ``node-wait-seconds`` have passed.

    Raises FederationError (never hangs silently) when fewer than ``min-sites`` connected in time.
    """
    deadline = time.monotonic() + settings.node_wait_seconds
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= settings.num_sites:
            return nodes
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if len(nodes) >= settings.required_sites:
        log.warning("%d of %d sites connected after %.0f s; going on", len(nodes), settings.num_sites,
                    settings.node_wait_seconds)
        return nodes
    raise FederationError(
        f"only {len(nodes)} of {settings.num_sites} sites connected within {settings.node_wait_seconds:.0f} s "
        f"(min-sites={settings.required_sites}); start the missing SuperNodes or lower num-sites/min-sites"
    )


def resolve_run_dir(settings: RunSettings) -> Path:
    """The run folder: ``run-dir`` or ``runs/<timestamp>``."""
    if settings.run_dir:
        return Path(settings.run_dir).expanduser()
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def run_federation(grid: Grid, settings: RunSettings) -> RunRecorder:
    """The whole run: sites -> round 0 -> ``num-rounds`` FedAvg rounds (checkpoint each) -> final model + summary."""
    run_dir = resolve_run_dir(settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, settings.to_config())
    recorder = RunRecorder(run_dir)

    model = build_from_settings(settings)  # while the sites connect
    spec = model_spec(model)
    arrays = ArrayRecord(family(settings.model).shared_state(model, settings.family_options))
    config = ConfigRecord(settings.round_config())
    nodes = wait_for_sites(grid, settings)
    log.info("federation of %d sites, model %s %s", len(nodes), spec["name"], spec["params"])

    strategy = SiteFedAvg(
        recorder=recorder,
        reference=arrays,
        required_sites=settings.required_sites,
        min_train_nodes=len(nodes),
        min_evaluate_nodes=len(nodes),
        min_available_nodes=settings.required_sites,
    )
    if settings.evaluate_round_zero:
        config["server-round"] = 0
        strategy.round_zero(grid, arrays, config, settings.round_timeout)

    def checkpoint(server_round: int, global_arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            write_global(run_dir, model, global_arrays, settings=settings, normalisation=recorder.normalisation,
                         name=LAST, round_=server_round)
        return None

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=settings.num_rounds,
        timeout=settings.round_timeout,
        train_config=config,
        evaluate_config=config,
        evaluate_fn=checkpoint,
    )
    write_global(run_dir, model, result.arrays, settings=settings, normalisation=recorder.normalisation,
                 name=FINAL, round_=settings.num_rounds)
    recorder.write_summary(settings.num_rounds, {"model": spec})
    log.info("run finished: %s", run_dir)
    return recorder


app = build_server_app()
