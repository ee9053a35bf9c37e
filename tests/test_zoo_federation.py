"""Every model family trains through Flower, and a self-supervised site joins a supervised federation.

One simulation engine start serves several runs: the ServerApp below runs one short federation per family on
the same three virtual SuperNodes: two paired phantom sites and one thick-slice site that declares
``supervision = "self"``. Paired families must refuse the self-supervised site (and go on with the other two);
the self-supervised ``smore`` family trains on all three. A Flower client mod records the keys of every
ArrayRecord that enters or leaves a site, so the tests can assert what crossed the wire.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import build_client_app
from client.degrade import PRESETS, degrade_inplane, degrade_isotropic, degrade_throughplane
from server.app import run_federation
from server.settings import RunSettings
from shared_models.checkpoint import load_checkpoint
from shared_models.gan import GanOptions
from shared_models.inference import super_resolve
from simulation.phantoms import write_phantom_sites
from tests.conftest import make_thick_site

RUNS = {
    "srcnn": dict(model="srcnn"),
    "edsr-3d": dict(model="edsr", spatial_dims=3, patch_size=16),
    "swinir": dict(model="swinir"),
    "gan-federated": dict(model="gan", options={"gan": GanOptions(discriminator="federated", warmup_rounds=0)}),
    "gan-local": dict(model="gan", options={"gan": GanOptions(discriminator="local", warmup_rounds=0)}),
    "smore": dict(model="smore"),
}
FINAL_FAMILY = {"gan-federated": "rrdb", "gan-local": "rrdb", "edsr-3d": "edsr"}


def array_keys(msg: Message) -> list[str]:
    """Every weight name a message carries, over all of its ArrayRecords."""
    return sorted(key for record in msg.content.array_records.values() for key in record.keys())


def wire_recorder(path: Path):
    """A client mod appending, per message, the run's model and the ArrayRecord keys in and out."""

    def record(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        config = msg.content["config"]
        row = {
            "model": str(config["model"]), "mode": str(config.get("gan.discriminator", "")),
            "type": msg.metadata.message_type, "node": int(context.node_config["partition-id"]),
            "in": array_keys(msg),
            "out": array_keys(reply) if reply.has_content() else [],
        }
        with path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        return reply

    return record


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    sites = write_phantom_sites(root / "sites", n_sites=3, subjects_per_site=3, shape=(48, 48, 16), seed=5)
    make_thick_site(sites[2], 2)
    base = RunSettings(
        num_rounds=1, num_sites=3, min_sites=2, local_steps=3, batch_size=4, patch_size=32, eval_max_slices=4,
        sites_dir=str(root / "sites"), node_wait_seconds=60.0,
    )
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for name, overrides in RUNS.items():
            run_federation(grid, base.replace(run_dir=str(root / name), **overrides))

    messages = root / "messages.jsonl"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("server").addHandler(handler)
    try:
        run_simulation(
            server_app=server,
            client_app=build_client_app([str(p) for p in sites], mods=[wire_recorder(messages)]),
            num_supernodes=3,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
        )
    finally:
        logging.getLogger("server").removeHandler(handler)
    rows = [json.loads(line) for line in messages.read_text().splitlines()]
    return root, [p.name for p in sites], rows, [r.getMessage() for r in records]


@pytest.mark.parametrize("run", list(RUNS))
def test_each_family_trains_and_its_checkpoint_is_applied_to_a_whole_volume(zoo, run):
    root, names, _rows, _log = zoo
    summary = json.loads((root / run / "summary.json").read_text())
    expected_sites = names if run == "smore" else names[:2]
    assert sorted(summary["sites"]) == sorted(expected_sites)
    model, meta = load_checkpoint(root / run / "final_model.pt")
    assert meta["model"]["name"] == FINAL_FAMILY.get(run, RUNS[run]["model"])

    hr = np.random.default_rng(0).random((48, 48, 16), dtype=np.float32)
    rng = np.random.default_rng(1)
    if run == "smore":
        hr, lr = degrade_throughplane(hr, PRESETS["mr-3t-kspace"], 2, (1.0, 1.0, 1.0), rng)
    elif run == "edsr-3d":
        hr, lr = degrade_isotropic(hr, PRESETS["mr-3t-kspace"], 2, (1.0, 1.0, 1.0), rng)
    else:
        hr, lr = degrade_inplane(hr, PRESETS["mr-3t-kspace"], 2, (1.0, 1.0, 1.0), rng)
    sr = super_resolve(model, lr)
    assert sr.shape == hr.shape and np.isfinite(sr).all()
    assert 0.0 <= sr.min() and sr.max() <= 1.0


def test_paired_families_refuse_the_self_supervised_site_by_name(zoo):
    _root, names, _rows, log = zoo
    # it fails while describing itself, before the coordinator knows its name: named by node, with the category
    # and the scrubbed detail; its folder's name stays at the site
    refusals = [m for m in log if "could not describe itself" in m and "site-data" in m]
    assert refusals and all("supervision" in m and names[2] not in m for m in refusals)


def test_a_local_discriminator_never_crosses_the_wire(zoo):
    _root, _names, rows, _log = zoo
    local = [r for r in rows if r["model"] == "gan" and r["mode"] == "local"]
    assert local and any(r["out"] for r in local)
    for row in local:
        assert not [k for k in row["in"] + row["out"] if k.startswith("discriminator.")]
        assert all(k.startswith("generator.") for k in row["in"])


def test_a_federated_gan_sends_both_networks_each_as_its_own_key_set(zoo):
    root, _names, rows, _log = zoo
    sent = [r["out"] for r in rows
            if r["model"] == "gan" and r["mode"] == "federated" and r["type"].startswith("train") and r["out"]]
    assert sent
    for keys in sent:
        generator = {k for k in keys if k.startswith("generator.")}
        discriminator = {k for k in keys if k.startswith("discriminator.")}
        assert generator and discriminator and generator | discriminator == set(keys)
    pair = torch.load(root / "gan-federated" / "checkpoint.pt", weights_only=True)["state_dict"]
    initial = torch.load(root / "gan-local" / "checkpoint.pt", weights_only=True)["state_dict"]
    changed = [k for k in pair if k.startswith("discriminator.") and not torch.equal(pair[k], initial[k])]
    assert changed  # the federated discriminator was trained and averaged; the local run's never left its init


def test_the_self_supervised_site_trains_the_same_architecture(zoo):
    _root, names, rows, _log = zoo
    smore = [r for r in rows if r["model"] == "smore" and r["type"] == "train"]
    assert {r["node"] for r in smore} == {0, 1, 2}
    assert len({tuple(r["out"]) for r in smore}) == 1  # one architecture, one key set, three sites
