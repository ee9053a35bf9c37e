"""The Flower ClientApp: one hospital. Message handlers only; the work lives in client.tasks.

What leaves the site: model weights and scalar metrics (plus the site's display name). A site's data path
comes from its own node config (``--node-config "site-dir='/data/site'"``), never from the coordinator.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.data.files import site_folders

if TYPE_CHECKING:
    from client.pairs import PreparedSite

log = logging.getLogger(__name__)


def build_client_app(simulated_site_dirs: Sequence[str] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp.

    ``simulated_site_dirs`` maps simulation partition ids to site folders (simulation only). ``mods`` are
    Flower client mods wrapped around every handler (e.g. Flower's DP clipping mods).
    """
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        task, job, site, model = _setup(msg, context, simulated_site_dirs)
        result = task.train(model, msg.content["arrays"].to_torch_state_dict(), site, job)
        metrics = dict(result.metrics, **{"skipped-files": len(site.skipped)})
        return _reply(msg, site, {"arrays": ArrayRecord(result.weights), "metrics": MetricRecord(metrics)})

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        task, job, site, model = _setup(msg, context, simulated_site_dirs)
        scores = task.evaluate(model, msg.content["arrays"].to_torch_state_dict(), site, job)
        scores["num-examples"] = scores["num-val-slices"]
        scores["skipped-files"] = len(site.skipped)
        return _reply(msg, site, {"metrics": MetricRecord(scores)})

    return app


def _setup(msg: Message, context: Context, simulated_site_dirs: Sequence[str] | None):
    """Read the round's job, load the site (cached) and build the model the round names.

    The site's stack (torch, readers, tasks) is imported here, at the first message, not with this module: a
    process that only builds the app (the simulation's driver) never needs it.
    """
    from client.device import resolve_device
    from client.tasks import RoundJob, task_for
    from shared_models.registry import build_from_settings

    config = msg.content["config"]
    device = resolve_device(str(context.node_config.get("device", config["device"])))  # the site's own wins
    job = RoundJob.from_config(config, device, context.node_config)
    task = task_for(job.model)
    site = task.prepare(str(resolve_site_dir(context, simulated_site_dirs)), job)
    return task, job, site, build_from_settings(job)


def _reply(msg: Message, site: PreparedSite, records: dict) -> Message:
    """The reply: the records plus what the site says of itself: its display name, the baseline its scores are
    compared with and its intensity mapping rule (numbers and names only, nothing of a scan)."""
    records["site"] = ConfigRecord(
        {"name": site.name, "baseline": site.pairing.baseline_method, "normalisation": json.dumps(site.intensity)}
    )
    return Message(content=RecordDict(records), reply_to=msg)


def resolve_site_dir(context: Context, simulated_site_dirs: Sequence[str] | None = None) -> Path:
    """Where this site's scans are.

    Deployment: the SuperNode's ``site-dir`` node config. Simulation: the site folder for this node's
    ``partition-id`` (from the runner, or the run config's ``sites-dir`` under ``flwr run``), numbered by
    :func:`client.data.files.site_folders` in both cases.
    """
    node = context.node_config
    if "site-dir" in node:
        return Path(str(node["site-dir"])).expanduser()
    if "partition-id" in node:
        partition = int(node["partition-id"])
        dirs = list(simulated_site_dirs or [])
        if not dirs and context.run_config.get("sites-dir"):
            dirs = site_folders(str(context.run_config["sites-dir"]))
        if partition < len(dirs):
            return Path(dirs[partition])
        raise RuntimeError(
            f"simulated node {partition} has no site folder ({len(dirs)} found); pass sites-dir with one "
            "sub-folder per simulated node (fedsr sites make-phantoms DIR --sites N writes them)"
        )
    raise RuntimeError(
        "this SuperNode has no site folder: start it with --node-config \"site-dir='/path/to/site'\""
    )


app = build_client_app()
