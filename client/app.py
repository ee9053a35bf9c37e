"""The Flower ClientApp: one hospital. Message handlers only; the work lives in pairs/training/evaluation.

What leaves the site: model weights and scalar metrics (plus the site's display name). A site's data path
comes from its own node config (``--node-config "site-dir='/data/site'"``), never from the coordinator.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.device import resolve_device
from client.evaluation import evaluate_pairs
from client.pairs import PreparedSite, prepare_site, site_seed
from client.training import PatchSampler, train_supervised
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
        config = msg.content["config"]
        site = _site(context, config, simulated_site_dirs)
        model = _model_from(msg)
        seed = site_seed(site.name, int(config["seed"]) * 100_003 + int(config["server-round"]))
        torch.manual_seed(seed)
        sampler = PatchSampler(site.train, site.scale, int(config["patch-size"]), np.random.default_rng(seed))
        stats = train_supervised(
            model,
            sampler,
            steps=int(config["local-steps"]),
            batch_size=int(config["batch-size"]),
            learning_rate=float(config["learning-rate"]),
            loss=str(config["loss"]),
            device=resolve_device(_device_spec(context, config)),
        )
        metrics = MetricRecord(
            {
                "num-examples": sum(p.hr.shape[2] for p in site.train),
                "train-loss": stats.loss,
                "train-patches": stats.patches,
                "train-seconds": stats.seconds,
                "skipped-files": len(site.skipped),
            }
        )
        weights = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
        return _reply(msg, site, {"arrays": weights, "metrics": metrics})

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        site = _site(context, config, simulated_site_dirs)
        scores = evaluate_pairs(
            _model_from(msg),
            site.val,
            scale=site.scale,
            device=resolve_device(_device_spec(context, config)),
            max_slices=int(config["eval-max-slices"]),
        )
        scores["num-examples"] = scores["num_val_slices"]
        scores["skipped-files"] = len(site.skipped)
        return _reply(msg, site, {"metrics": MetricRecord(scores)})

    return app


def _reply(msg: Message, site: PreparedSite, records: dict) -> Message:
    records["site"] = ConfigRecord({"name": site.name})
    return Message(content=RecordDict(records), reply_to=msg)


def _model_from(msg: Message) -> torch.nn.Module:
    """Build the architecture the coordinator names and load the global weights into it."""
    config = msg.content["config"]
    model = build_model(str(config["model"]), **json.loads(str(config["model-params"])))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def _device_spec(context: Context, config: ConfigRecord) -> str:
    """A site's own ``device`` node config wins over the run's."""
    return str(context.node_config.get("device", config["device"]))


def _site(context: Context, config: ConfigRecord, simulated_site_dirs: Sequence[str] | None) -> PreparedSite:
    return prepare_site(str(resolve_site_dir(context, simulated_site_dirs)), int(config["scale"]))


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
