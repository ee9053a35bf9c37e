"""The Flower ServerApp: waits for the sites, trains the federated model(s) and the baselines, scores every model at
every site, writes the run record and the report.

The coordinator never reads a scan: it builds the architecture, sends weights and round settings, and receives
weights and numbers (and example crops only from sites whose site.toml consents). A stopped run goes on with
``resume``: each federation after the last round its checkpoint holds, then everything after the federations again.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server.baselines import pooled_problem, train_local_models, train_pooled_model
from server.central_dp import central_privacy
from server.checkpoint import (
    CHECKPOINTS, FINAL, LAST, RoundState, completed_rounds, resume_points, resumed_recorder, write_global,
)
from server.cross_site import cross_evaluate, write_cross_site
from server.federation import train_federated
from server.report import write_report
from server.run_log import RunRecorder, check_resumed_config, file_stem, write_run_config
from server.settings import RunSettings
from server.sites import FederationError, SiteGrid, describe_sites
from shared_models.conditioning import conditioning_summary
from shared_models.personal import personalisation_summary
from shared_models.registry import build_from_settings, family, model_spec

log = logging.getLogger(__name__)

#: Sub-folder of the run folder for every finished model besides the main one (final_model.pt).
MODELS = "models"


def build_server_app(settings: RunSettings | None = None) -> ServerApp:
    """The ServerApp. With ``settings`` (simulation) they are used as given; otherwise read from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # Under flwr-serverapp nothing configures logging: without this `flwr log` would show warnings only. A
        # no-op in the simulation, whose runner configured it already.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to the SuperLink otherwise
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
    """The whole run: the sites describe themselves -> the federated model(s) (``global``, or ``holdout:SITE`` per
    held-out site) -> the baselines (``local:SITE``, ``pooled``) -> every model scored at every site's test split ->
    ``cross_site.json``, ``summary.json``, ``report.json`` and ``report.html``.

    Resumed (``resume``): each federation goes on after the last round its checkpoint holds (one that had completed
    none starts afresh); the baselines and the cross-site evaluation, which come after the federations, run again.
    """
    run_dir = resolve_run_dir(settings)
    recorder, resumed = open_run(run_dir, settings)
    problem = pooled_problem(settings)
    if problem:
        raise FederationError(problem)

    model = build_from_settings(settings)  # while the sites connect
    spec = model_spec(model)
    initial = ArrayRecord(family(settings.model).shared_state(model, settings.family_options))
    nodes = wait_for_sites(grid, settings)
    sites = describe_sites(grid, nodes, ConfigRecord(settings.round_config()), settings.round_timeout,
                           run_dir / "messages.jsonl")
    if len(sites.sites) < settings.required_sites:
        raise FederationError(f"only {len(sites.sites)} site(s) could prepare their data, {settings.required_sites} "
                              "required (min-sites); see the errors above for each failing site")
    plan = federations(sites, settings)
    log.info("%d sites, model %s %s; federations: %s", len(sites.sites), spec["name"], spec["params"],
             ", ".join(plan))

    models: dict[str, ArrayRecord] = {}
    for index, (name, members) in enumerate(plan.items()):
        models[name] = train_federated(
            members, settings, model, initial, recorder, experiment=name,
            round_zero=settings.evaluate_round_zero and index == 0, checkpoint=checkpoint_file(name, index),
            resumed=resumed.get(name),
        )
        target = FINAL if index == 0 else model_file(name)
        write_global(run_dir, model, models[name], settings=settings, normalisation=recorder.normalisation,
                     name=target, round_=settings.num_rounds, export=True)
    main = next(iter(plan))
    extra = {"model": spec, **({"central_dp": central_privacy(settings)} if settings.dp == "central" else {})}
    extra.update({key: value for key, value in (("personal", personalisation_summary(model, settings)),
                                                ("conditioning", conditioning_summary(model))) if value})
    recorder.write_summary(settings.num_rounds, main, extra,
                           members=[site.name for site in plan[main].sites.values()])

    trained_on = {name: sorted(site.name for site in members.sites.values()) for name, members in plan.items()}
    kept: tuple[str, ...] = ()
    trainers = sites.named("baselines", [s for s in sites.sites.values() if s.name != settings.holdout_site])
    if "local" in settings.baseline_kinds:
        local = train_local_models(trainers.named("local"), settings, initial, recorder)
        kept = local.kept
        for site, arrays in local.shared.items():
            models[f"local:{site}"] = arrays
        trained_on.update({f"local:{site}": [site] for site in (*local.shared, *local.kept)})
    if "pooled" in settings.baseline_kinds:
        pooled = train_pooled_model(trainers.named("pooled"), settings, initial, recorder)
        if pooled is not None:
            models["pooled"] = pooled
            trained_on["pooled"] = sorted(site.name for site in trainers.sites.values())
    for name, arrays in models.items():
        if name.startswith(("local:", "pooled")):
            write_global(run_dir, model, arrays, settings=settings, normalisation=recorder.normalisation,
                         name=model_file(name), round_=settings.num_rounds, export=True)

    results = cross_evaluate(sites.named("cross-site"), settings, models, score_own_local=bool(kept),
                             recorder=recorder)
    results.notes[:0] = [f"local:{site} stays at {site} (its site.toml keeps it there): scored at {site} only"
                         for site in kept]
    write_cross_site(run_dir, results, site_descriptions(sites, plan), model_descriptions(trained_on, kept))
    try:
        report, page = write_report(run_dir)
    except Exception as error:  # the report is derived: a failure must not lose the run, whose results are stored
        log.error("the report could not be written (%s); rebuild it with: fedsr report %s", error, run_dir)
    else:
        log.info("run finished: %s (report: %s, %s)", run_dir, report, page)
    return recorder


def open_run(run_dir: Path, settings: RunSettings) -> tuple[RunRecorder, dict[str, RoundState]]:
    """The run's record, and when resuming each federation's last completed round (``{name: state}``; empty for a
    new run, which writes ``config.toml``). A resumed run's settings must be those of its ``config.toml``; it needs
    the main federation's checkpoint (ResumeError naming the file otherwise)."""
    if not settings.resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, settings.to_config())
        return RunRecorder(run_dir), {}
    check_resumed_config(run_dir, settings.to_config())
    resumed = completed_rounds(run_dir)
    log.info("resuming %s: %s", run_dir, resume_points(resumed))
    return resumed_recorder(run_dir, resumed), resumed


def model_file(name: str) -> str:
    """Where a finished model besides the main one is saved in the run folder: ``models/local-SITE.pt`` ..."""
    return f"{MODELS}/{_stem(name)}.pt"


def checkpoint_file(name: str, index: int) -> str:
    """Where the ``index``-th federation of the run's plan keeps its latest round: ``checkpoint.pt`` for the first
    (the run's main model), ``checkpoints/holdout-SITE.pt`` for the others."""
    return LAST if index == 0 else f"{CHECKPOINTS}/{_stem(name)}.pt"


def _stem(name: str) -> str:
    """A model's name as a file name: ``holdout:site a`` -> ``holdout-site_a``."""
    return file_stem(name.replace(":", "-"))


def federations(sites: SiteGrid, settings: RunSettings) -> dict[str, SiteGrid]:
    """The federated models a run trains, each with its sites: ``global`` (every site) unless ``holdout-site``
    names one (then ``holdout:SITE`` alone); with ``leave-one-out`` also ``holdout:SITE`` for every site."""
    names = [site.name for site in sites.sites.values()]
    if settings.holdout_site:
        if settings.holdout_site not in names:
            raise FederationError(f"holdout-site {settings.holdout_site!r} is not one of the sites ({', '.join(names)})"
                                  "; use the name in its site.toml")
        if len(names) < 2:
            raise FederationError("holdout-site needs at least two sites: one to hold out, one to train")
        name = f"holdout:{settings.holdout_site}"
        return {name: sites.without(settings.holdout_site, name)}
    plan = {"global": sites.named("global")}
    if settings.leave_one_out:
        if len(names) < 2:
            raise FederationError("leave-one-out needs at least two sites")
        plan.update({f"holdout:{name}": sites.without(name, f"holdout:{name}") for name in names})
    return plan


def site_descriptions(sites: SiteGrid, plan: dict[str, SiteGrid]) -> dict[str, dict]:
    """What each site said of itself, plus whether it trained the run's main federated model."""
    main = next(iter(plan.values()))
    return {site.name: {**site.about, "in_federation": site.node_id in main.sites} for site in sites.sites.values()}


def model_descriptions(trained_on: dict[str, list[str]], kept: tuple[str, ...]) -> dict[str, dict]:
    """Kind and training sites of every model (``cross_site.json``'s ``models``)."""
    described: dict[str, dict] = {}
    for name, members in trained_on.items():
        kind = name.partition(":")[0]
        entry: dict = {"kind": {"global": "federated"}.get(kind, kind), "trained_on": members}
        if kind == "local":
            entry["shared"] = members[0] not in kept
        if kind == "holdout":
            entry["held_out"] = name.partition(":")[2]
        described[name] = entry
    described["interpolation"] = {"kind": "interpolation", "trained_on": []}
    return described


app = build_server_app()
