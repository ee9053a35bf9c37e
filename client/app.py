"""The Flower ClientApp: one hospital. Message handlers only; the work lives in client.tasks and client.cross_site.

Messages: ``train`` / ``evaluate`` (a federated round), ``query.describe`` (what the report shows of the site),
``train.local`` (its local-only baseline), ``train.pooled`` (simulation only: the pooled baseline) and
``evaluate.cross`` (every model of the run on the site's test split, once, after training).
What leaves the site: model weights and numbers (plus its display name and description); its local-only model and
example crops only when its site.toml consents. A site's data path comes from its own node config
(``--node-config "site-dir='/data/site'"``), never from the coordinator, and so does the most memory its prepared
sites may take (``data-cache-mb``, :func:`client.pairs.set_data_cache_limit`). Weights arrive and leave in the
round's ``transfer-dtype`` (float16 halves the bytes); the site trains and keeps its weights in float32.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.central_dp import central_clipping_mod
from client.data.files import site_folders
from client.data.siteconfig import load_site_config
from client.policy import check_policy, refusal_mod
from client.safe_errors import safe_errors_mod

if TYPE_CHECKING:
    import torch

    from client.pairs import PreparedSite

log = logging.getLogger(__name__)

#: Where a site keeps its local-only model for the run (``context.state`` lives as long as the run).
OWN_LOCAL_MODEL = "own-local-model"
#: The run's main federated model in the cross-site evaluation (the coordinator's name for it).
GLOBAL = "global"


def build_client_app(simulated_site_dirs: Sequence[str] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp.

    ``simulated_site_dirs`` maps simulation partition ids to site folders (simulation only). ``mods`` are
    Flower client mods wrapped around every handler (e.g. Flower's DP clipping mods).
    """
    # safe_errors_mod outermost: an exception leaves the site as a category, never with its text (paths);
    # refusal_mod outside ``mods``: they never get a refusal, which has no weights; central_clipping_mod (central DP,
    # client-side clipping) innermost of ours: the last to touch the update before it leaves
    app = ClientApp(mods=[safe_errors_mod, refusal_mod, central_clipping_mod, *mods])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        task, job, site, model = _setup(msg, context, simulated_site_dirs)
        result = task.train(model, received_weights(msg.content["arrays"]), site, job)
        metrics = dict(result.metrics, **{"skipped-files": len(site.skipped)})
        return _reply(msg, site, {"arrays": sent_arrays(result.weights, job.transfer_dtype),
                                  "metrics": MetricRecord(metrics)})

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        task, job, site, model = _setup(msg, context, simulated_site_dirs)
        scores = task.evaluate(model, received_weights(msg.content["arrays"]), site, job)
        scores["num-examples"] = scores["num-val-slices"]
        scores["skipped-files"] = len(site.skipped)
        return _reply(msg, site, {"metrics": MetricRecord(scores)})

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        from client.cross_site import describe as describe_site

        _task, _job, site, _model = _setup(msg, context, simulated_site_dirs)
        return _reply(msg, site, {}, about=describe_site(site))

    @app.train("local")
    def train_local(msg: Message, context: Context) -> Message:
        """The site's local-only baseline; its weights leave the site only if its site.toml allows it."""
        task, job, site, model = _setup(msg, context, simulated_site_dirs)
        job = job.replace(purpose="local-baseline")
        result = task.train_alone(model, received_weights(msg.content["arrays"]), site, job,
                                  int(msg.content["config"]["local-rounds"]))
        context.state[OWN_LOCAL_MODEL] = ArrayRecord(result.weights)  # kept in float32: it never travels from here
        records: dict = {"metrics": MetricRecord(dict(result.metrics, **{"skipped-files": len(site.skipped)}))}
        if site.config.share_local_model:
            records["arrays"] = sent_arrays(result.weights, job.transfer_dtype)
        return _reply(msg, site, records)

    @app.train("pooled")
    def train_pooled(msg: Message, context: Context) -> Message:
        """Simulation only: one model on every simulated site's training data, with the federation's compute. Its
        weights come back in float32 whatever the transfer dtype: they never cross a network."""
        from client.cross_site import pooled_site

        task, job, site, model = _setup(msg, context, simulated_site_dirs)
        config = msg.content["config"]
        job = job.replace(purpose="pooled", local_steps=int(config["pooled-steps"]))
        dirs = _simulated_site_dirs(context, simulated_site_dirs)
        if not dirs:
            raise RuntimeError("the pooled baseline needs every site's data: only a simulated site has it")
        pooled = pooled_site([task.prepare(str(folder), job) for folder in dirs])
        result = task.train_alone(model, received_weights(msg.content["arrays"]), pooled, job,
                                  int(config["local-rounds"]))
        return _reply(msg, site, {"arrays": ArrayRecord(result.weights), "metrics": MetricRecord(result.metrics)})

    @app.evaluate("cross")
    def evaluate_cross(msg: Message, context: Context) -> Message:
        """Every model sent (and this site's own local-only model, if it kept it) on the site's test split, and
        the membership-inference check of the global model (client.membership)."""
        from client.cross_site import score_models
        from client.membership import MEMBERSHIP, membership_attack

        task, job, site, model = _setup(msg, context, simulated_site_dirs)
        models = {key.removeprefix("model:"): received_weights(record)
                  for key, record in msg.content.array_records.items() if key.startswith("model:")}
        own = f"local:{site.name}"
        if msg.content["config"].get("score-own-local") and own not in models and OWN_LOCAL_MODEL in context.state:
            models[own] = context.state[OWN_LOCAL_MODEL].to_torch_state_dict()
        scores, previews = score_models(task, model, site, job, models)
        records: dict = {f"scores:{name}": MetricRecord(values) for name, values in scores.items()}
        if previews is not None:
            records["previews"] = ArrayRecord({name: Array(crop) for name, crop in previews.items()})
        if GLOBAL in models:  # the released model: how well a simple attacker tells its training patients apart
            task.load_global(model, models[GLOBAL], site, job)
            attack = membership_attack(model, site, job)
            if attack is not None:
                records[MEMBERSHIP] = MetricRecord(attack)
        return _reply(msg, site, records)

    return app


def _setup(msg: Message, context: Context, simulated_site_dirs: Sequence[str] | None):
    """Read the round's job, check it against the site's ``[policy]``, load the site (cached) and build the model
    the round names.

    A request outside the policy raises :class:`client.policy.SiteRefusal` before any data is prepared for it
    (:func:`client.policy.refusal_mod` makes it the reply). The site's stack (torch, readers, tasks) is imported
    here, at the first message, not with this module: a process that only builds the app (the simulation's
    driver) never needs it.
    """
    from client.device import resolve_device
    from client.pairs import set_data_cache_limit
    from client.tasks import RoundJob, task_for
    from shared_models.registry import build_from_settings

    config = msg.content["config"]
    device = resolve_device(str(context.node_config.get("device", config["device"])))  # the site's own wins
    job = RoundJob.from_config(config, device, context.node_config, run_id=context.run_id)
    site_dir = resolve_site_dir(context, simulated_site_dirs)
    site_config = load_site_config(site_dir)  # site.toml alone, read for every message: an edited policy applies
    check_policy(site_config.policy, job, msg.metadata.message_type, site_config.name)
    task = task_for(job.model)
    set_data_cache_limit(context.node_config)
    site = task.prepare(str(site_dir), job)
    return task, job, site, build_from_settings(job)


def received_weights(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The weights of an ``ArrayRecord`` the coordinator sent, as torch tensors, float16 ones cast to float32
    (``transfer-dtype = "float16"``): the site trains and scores in float32. Other dtypes come as they were sent."""
    import torch

    weights = record.to_torch_state_dict()
    return {key: value.float() if value.dtype == torch.float16 else value for key, value in weights.items()}


def sent_arrays(weights: Mapping[str, torch.Tensor], transfer_dtype: str) -> ArrayRecord:
    """The ``ArrayRecord`` of weights that leave the site in ``transfer_dtype``: with ``"float16"`` every floating
    tensor is cast to float16 (half the bytes; the coordinator casts back to float32), other tensors as they are."""
    if transfer_dtype == "float16":
        weights = {key: value.half() if value.is_floating_point() else value for key, value in weights.items()}
    return ArrayRecord(dict(weights))


def _reply(msg: Message, site: PreparedSite, records: dict, about: dict | None = None) -> Message:
    """The reply: the records plus what the site says of itself: its display name, the baseline its scores are
    compared with and its intensity mapping rule (numbers and names only, nothing of a scan); ``about``: its
    description for the report (JSON), in the reply to ``query.describe``."""
    said = {"name": site.name, "baseline": site.pairing.baseline_method, "normalisation": json.dumps(site.intensity)}
    if about is not None:
        said["about"] = json.dumps(about)
    records["site"] = ConfigRecord(said)
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
        dirs = _simulated_site_dirs(context, simulated_site_dirs)
        if partition < len(dirs):
            return Path(dirs[partition])
        raise RuntimeError(
            f"simulated node {partition} has no site folder ({len(dirs)} found); pass sites-dir with one "
            "sub-folder per simulated node (fedsr sites make-phantoms DIR --sites N writes them)"
        )
    raise RuntimeError(
        "this SuperNode has no site folder: start it with --node-config \"site-dir='/path/to/site'\""
    )


def _simulated_site_dirs(context: Context, simulated_site_dirs: Sequence[str] | None) -> list[str]:
    """Every simulated site's folder (from the runner, or the run config's ``sites-dir`` under ``flwr run``); empty
    on a real SuperNode, which knows its own folder only."""
    if "partition-id" not in context.node_config:
        return []
    if simulated_site_dirs:
        return list(simulated_site_dirs)
    if context.run_config.get("sites-dir"):
        return [str(folder) for folder in site_folders(str(context.run_config["sites-dir"]))]
    return []


app = build_client_app()
