"""The Flower ClientApp: one hospital. Message handlers only; the work lives in client.tasks.

What leaves the site: model weights and scalar metrics (plus the site's display name). A site's data path
comes from its own node config (``--node-config "site-dir='/data/site'"``), never from the coordinator.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.device import resolve_device
from client.pairs import PreparedSite
from client.tasks import LocalTask, RoundJob, task_for
from shared_models.registry import build_model

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
        result = task.train(model, site, job, context.state)
        metrics = dict(result.metrics, **{"skipped-files": len(site.skipped)})
        return _reply(msg, site, {"arrays": ArrayRecord(result.weights), "metrics": MetricRecord(metrics)})

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        task, job, site, model = _setup(msg, context, simulated_site_dirs)
        scores = task.evaluate(model, site, job)
        scores["num-examples"] = scores["num_val_slices"]
        scores["skipped-files"] = len(site.skipped)
        return _reply(msg, site, {"metrics": MetricRecord(scores)})

    return app


def _setup(msg: Message, context: Context, simulated_site_dirs: Sequence[str] | None):
    """Read the round's job, load the site (cached), build the named model and load the global weights."""
    config = msg.content["config"]
    job = RoundJob.from_config(config, resolve_device(_device_spec(context, config)))
    task: LocalTask = task_for(job.model)
    site: PreparedSite = task.prepare(str(resolve_site_dir(context, simulated_site_dirs)), job)
    model = build_model(job.model, **job.model_params)
    task.load_global(model, msg.content["arrays"].to_torch_state_dict(), context.state, site)
    return task, job, site, model


def _reply(msg: Message, site: PreparedSite, records: dict) -> Message:
    records["site"] = ConfigRecord({"name": site.name})
    return Message(content=RecordDict(records), reply_to=msg)


def _device_spec(context: Context, config: ConfigRecord) -> str:
    """A site's own ``device`` node config wins over the run's."""
    return str(context.node_config.get("device", config["device"]))


def resolve_site_dir(context: Context, simulated_site_dirs: Sequence[str] | None = None) -> Path:
    """Where this site's scans are.

    Deployment: the SuperNode's ``site-dir`` node config. Simulation: the site folder for this node's
    ``partition-id`` (from the runner, or the run config's ``sites-dir`` under ``flwr run``).
    """
    node = context.node_config
    if "site-dir" in node:
        return Path(str(node["site-dir"])).expanduser()
    if "partition-id" in node:
        partition = int(node["partition-id"])
        dirs = list(simulated_site_dirs or [])
        if not dirs and context.run_config.get("sites-dir"):
            root = Path(str(context.run_config["sites-dir"])).expanduser()
            dirs = sorted(str(p) for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
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
