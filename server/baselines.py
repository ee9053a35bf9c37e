"""The reference models trained in the same run as the federated one, with the same compute.

- ``local:SITE``: each site trains alone from the same initial weights, ``num-rounds`` x ``local-steps`` steps (its
  share of the federation's compute, in the same rounds with the same patches), message ``train.local``. Its weights
  come back only when the site's ``site.toml`` says ``share_local_model = true``; otherwise the site keeps them and
  scores them at home during the cross-site evaluation.
- ``pooled`` (simulation only): one model trained on every site's training data pooled, ``num-rounds`` x
  (sites x ``local-steps``) steps (the federation's total compute), message ``train.pooled`` to one simulated site,
  the only place that can read every site's folder. In a real deployment no site can, and none should.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from server.run_log import RunRecorder
from server.settings import RunSettings
from server.sites import SiteGrid, site_about
from server.strategies import note_refusal
from server.updates import update_problem

log = logging.getLogger(__name__)

TRAIN_LOCAL = "train.local"
TRAIN_POOLED = "train.pooled"


@dataclass(frozen=True)
class LocalModels:
    """The local-only models: ``shared`` {site: weights} that came back, ``kept`` sites that keep theirs."""

    shared: dict[str, ArrayRecord]
    kept: tuple[str, ...]


def pooled_problem(settings: RunSettings) -> str | None:
    """Why the pooled baseline cannot be trained in this run, or None."""
    if "pooled" in settings.baseline_kinds and not settings.sites_dir:
        return ("baselines 'pooled' needs every site's data in one place, which only a simulation has (sites-dir): "
                "drop it (--baselines local) in a real deployment")
    return None


def _config(settings: RunSettings, **extra: int) -> ConfigRecord:
    config = ConfigRecord(settings.round_config())
    config["server-round"] = settings.num_rounds
    for key, value in extra.items():
        config[key] = value
    return config


def train_local_models(
    grid: SiteGrid, settings: RunSettings, initial: ArrayRecord, recorder: RunRecorder
) -> LocalModels:
    """Every site of ``grid`` trains its local-only model; a site that fails or refuses is logged and left out."""
    config = _config(settings, **{"local-rounds": settings.num_rounds})
    messages = [
        grid.create_message(RecordDict({"arrays": initial, "config": config}), TRAIN_LOCAL, node, group_id="local")
        for node in grid.sites
    ]
    shared, kept = {}, []
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout * settings.num_rounds):
        site = grid.site_of(reply)  # an error reply does not name its site
        if reply.has_error():
            log.error("site %s could not train its local-only model: %s", site, reply.error.reason)
            continue
        if note_refusal(reply, recorder, settings.num_rounds, f"local:{site}"):
            continue
        content = reply.content
        recorder.record(settings.num_rounds, "train", site, dict(content["metrics"]), site_about(reply),
                        f"local:{site}")
        if not content.array_records:
            kept.append(site)
            continue
        problem = update_problem(content, initial)
        if problem:
            log.error("site %s: local-only model rejected: %s", site, problem)
            continue
        shared[site] = content["arrays"]
    return LocalModels(shared, tuple(sorted(kept)))


def train_pooled_model(
    grid: SiteGrid, settings: RunSettings, initial: ArrayRecord, recorder: RunRecorder
) -> ArrayRecord | None:
    """The pooled model, trained by the first site of ``grid`` on every simulated site's training data; None when
    that site fails or refuses."""
    sites = len(grid.sites)
    config = _config(settings, **{"local-rounds": settings.num_rounds, "pooled-steps": settings.local_steps * sites})
    node = min(grid.sites, key=lambda n: grid.sites[n].name)
    message = grid.create_message(RecordDict({"arrays": initial, "config": config}), TRAIN_POOLED, node, "pooled")
    (reply,) = grid.send_and_receive([message], timeout=settings.round_timeout * settings.num_rounds * sites)
    if reply.has_error():
        log.error("the pooled baseline failed at site %s: %s", grid.site_of(reply), reply.error.reason)
        return None
    if note_refusal(reply, recorder, settings.num_rounds, "pooled"):
        return None
    problem = update_problem(reply.content, initial)
    if problem:
        log.error("pooled model rejected: %s", problem)
        return None
    recorder.record(settings.num_rounds, "train", "pooled", dict(reply.content["metrics"]), {}, "pooled")
    return reply.content["arrays"]
