"""No wait without a deadline: the federation samples its sites with ``node-wait-seconds`` of ours.

Flower's own sampling waits with no deadline until ``min_*_nodes`` nodes are online, so one SuperNode gone for good
would stop the run forever. :class:`server.strategies.SiteStrategy` waits at most ``node-wait-seconds``, goes on
with the connected sites when at least ``min-sites`` are there, names the missing ones, and samples a site again
once it is back; with too few sites it stops with an error that names them and says what to do.

1. A real Flower grid (the SuperLink's link state, in memory) whose nodes come and go as a SuperNode's do: a node
   is online while it sends heartbeats, and goes offline when they stop (a killed SuperNode) or when it says
   goodbye. Fast.
2. (slow) A federation on Flower's simulation engine: phantom sites, the project's ClientApp, a site whose node
   goes offline after round 1 and online after round 2.
3. (slow) Real processes (``tests/flower_processes.py``): a SuperLink with TLS and node authentication and two
   SuperNodes on 127.0.0.1, running the app with ``flwr run``; one site's SuperNode is stopped during a run and
   restarted (the run waits for it and it trains again); the SuperLink is stopped mid-run and the run resumed
   (bit-identical to a run never stopped); then a SuperNode is stopped for good in a run that needs both sites
   (the run fails within the deadline, naming it).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID, TaskType
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from client.app import build_client_app
from flower_processes import LocalFederation, phantom_sites, tiny_run_config
from server.app import wait_for_sites
from server.run_log import RunRecorder
from server.settings import RunSettings
from server.sites import FederationError, SiteGrid, SiteInfo, describe_sites
from server.strategies import SiteStrategy
from shared_models.registry import build_from_settings, family

NAMES = ("site-a", "site-b", "site-c")
#: How long a live node's heartbeat keeps it online (seconds): longer than any test here.
ALIVE = 600.0


class Federation:
    """A real Flower grid over the SuperLink's in-memory link state, with one registered node per site name."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        self.state = factory.state()
        run_id = self.state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                                       TaskType.SERVER_APP)
        self.grid = InMemoryGrid(factory)
        run = self.state.get_run_info(run_ids=[run_id])[0]
        self.grid.set_run(run)
        # Messages take their run from the process's task identity, which a ServerApp process sets at its start.
        monkeypatch.setattr(TaskIdentity, "_task_id", run.primary_task_id)
        monkeypatch.setattr(TaskIdentity, "_run_id", run_id)
        monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
        self.nodes = {
            name: self.state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), heartbeat_interval=1)
            for name in NAMES
        }
        for name in NAMES:
            self.connect(name)
        self.sites = SiteGrid(self.grid, [SiteInfo(node, name, {}) for name, node in self.nodes.items()], "global",
                              tmp_path / "messages.jsonl")
        self.run_dir = tmp_path

    def connect(self, name: str) -> None:
        """The site's SuperNode sends a heartbeat (it connects, or reconnects)."""
        assert self.state.acknowledge_node_heartbeat(self.nodes[name], ALIVE)

    def kill(self, name: str) -> None:
        """The site's SuperNode dies: its heartbeats stop and the link marks it offline when the last one expires."""
        assert self.state.acknowledge_node_heartbeat(self.nodes[name], 0.05)
        deadline = time.monotonic() + 5
        while self.nodes[name] in set(self.grid.get_node_ids()):
            assert time.monotonic() < deadline, "the link never marked the node offline"
            time.sleep(0.05)

    def strategy(self, required: int, wait: float) -> SiteStrategy:
        return SiteStrategy(recorder=RunRecorder(self.run_dir), reference=ArrayRecord(), required_sites=required,
                          experiment="global", node_wait_seconds=wait)

    def named(self, nodes) -> list[str]:
        return [self.sites.sites[node].name for node in nodes]


@pytest.fixture
def federation(tmp_path, monkeypatch):
    return Federation(tmp_path, monkeypatch)


@pytest.fixture
def warnings(caplog):
    caplog.set_level(logging.INFO, logger="server.strategies")
    return caplog


def timed(call, limit: float = 20.0):
    """``call()``'s result and how long it took; fails (rather than hangs) when it is still waiting after ``limit`` s."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:  # handed to the test below
            outcome["error"] = error

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        pytest.fail(f"still waiting after {limit:g} s: a wait without a deadline")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], time.monotonic() - start


def test_every_connected_site_is_sampled_at_once_in_name_order(federation):
    strategy = federation.strategy(required=2, wait=30)
    nodes, seconds = timed(lambda: strategy.sample_sites(federation.sites, 1, "train"))
    assert federation.named(nodes) == list(NAMES)
    assert seconds < 5  # nobody is missing: no wait
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({"lr": 0.1}), federation.sites))
    assert [m.metadata.dst_node_id for m in messages] == nodes
    assert all(m.content["config"]["server-round"] == 1 and m.metadata.message_type == "train" for m in messages)


def test_a_killed_site_costs_one_wait_then_the_rounds_go_on_without_it_until_it_is_back(federation, warnings):
    strategy = federation.strategy(required=2, wait=1.5)
    federation.kill("site-b")
    nodes, seconds = timed(lambda: strategy.sample_sites(federation.sites, 2, "train"))
    assert federation.named(nodes) == ["site-a", "site-c"]
    assert 1.5 <= seconds < 5  # waited for site-b until the deadline, no longer
    assert any(r.levelno == logging.WARNING and "round 2 train" in r.message and "site-b" in r.message
               and "site-a" not in r.message for r in warnings.records)

    messages, seconds = timed(lambda: list(strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(),
                                                                       federation.sites)))
    assert federation.named(m.metadata.dst_node_id for m in messages) == ["site-a", "site-c"]
    assert seconds < 1  # a site already missing is not waited for again

    federation.connect("site-b")
    nodes = strategy.sample_sites(federation.sites, 3, "train")
    assert federation.named(nodes) == list(NAMES)
    assert any("site-b is connected again" in r.message for r in warnings.records)


def test_a_site_that_reconnects_within_the_deadline_is_waited_for(federation):
    strategy = federation.strategy(required=2, wait=30)
    federation.kill("site-c")
    later = threading.Timer(0.5, federation.connect, args=("site-c",))
    later.start()
    try:
        nodes, seconds = timed(lambda: strategy.sample_sites(federation.sites, 1, "train"))
    finally:
        later.join()
    assert federation.named(nodes) == list(NAMES)
    assert 0.4 <= seconds < 10  # ended when site-c came back, not at the deadline


def test_too_few_sites_stop_the_run_at_the_deadline_naming_the_missing_ones(federation):
    strategy = federation.strategy(required=2, wait=1.0)
    federation.kill("site-a")
    assert federation.state.deactivate_node(federation.nodes["site-c"])  # a SuperNode that said goodbye
    with pytest.raises(FederationError) as raised:
        timed(lambda: strategy.sample_sites(federation.sites, 4, "evaluate"))
    message = str(raised.value)
    assert "round 4 evaluate" in message and "site-a, site-c" in message and "site-b" not in message
    assert "1 of 3 sites" in message and "min-sites" in message and "Start the SuperNodes" in message


def test_sites_that_vanish_after_sampling_are_named_in_the_round_s_error(federation, warnings):
    strategy = federation.strategy(required=1, wait=1.0)
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), federation.sites)
    federation.kill("site-b")  # after it was sent its message: the link answers for it with an error reply
    replies, seconds = timed(lambda: list(federation.sites.send_and_receive(messages, timeout=1.0)))
    assert seconds < 10  # round-timeout is a deadline for the replies
    assert [reply.has_error() for reply in replies] == [True]  # the link's reply for site-b, which names no site
    with pytest.raises(FederationError) as raised:
        strategy.aggregate_train(1, replies)
    assert "0 of 3 site(s) replied usably" in str(raised.value)
    assert "no usable reply from: site-a, site-b, site-c" in str(raised.value) and "min-sites" in str(raised.value)
    errors = [r.message for r in warnings.records if r.levelno == logging.ERROR]
    assert any(m.startswith("round 1 train: site site-b failed") for m in errors), errors
    assert sum("no reply from site" in m for m in errors) == 2  # site-a and site-c: nothing ran their ClientApp


def test_the_deadline_holds_when_too_few_sites_were_ever_there(federation):
    strategy = federation.strategy(required=3, wait=1.0)
    federation.kill("site-b")
    start = time.monotonic()
    with pytest.raises(FederationError, match="missing: site-b"):
        timed(lambda: strategy.sample_sites(federation.sites, 1, "train"))
    assert 1.0 <= time.monotonic() - start < 5


# ---------------------------------------------------------------------------- a real federation (slow)
def disconnecting_server_app(settings: RunSettings, outcome: dict) -> ServerApp:
    """A ServerApp running SiteStrategy over the project's sites, whose site-2 disconnects after round 1 and
    reconnects after round 2 (through the simulation's link state: a SuperNode's node going offline and online);
    then a second federation that needs both sites while site-2 is gone. ``outcome`` gets what happened."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_dir = Path(settings.run_dir)
        config = ConfigRecord(settings.round_config())
        sites = describe_sites(grid, wait_for_sites(grid, settings), config, settings.round_timeout,
                               run_dir / "messages.jsonl")
        gone = next(site.node_id for site in sites.sites.values() if site.name.startswith("site-2"))
        state = grid.state  # the simulation's LinkState: where a SuperNode's presence is kept

        def network(server_round: int, _arrays: ArrayRecord) -> None:
            if server_round == 1:
                assert state.deactivate_node(gone)
            if server_round == 2:
                assert state.acknowledge_node_heartbeat(gone, HEARTBEAT_INTERVAL_INF)

        model = build_from_settings(settings)
        initial = ArrayRecord(family(settings.model).shared_state(model, settings.family_options))
        recorder = RunRecorder(run_dir)
        one = SiteStrategy(recorder=recorder, reference=initial, required_sites=1, experiment="global",
                         node_wait_seconds=settings.node_wait_seconds)
        one.start(grid=sites.named("global"), initial_arrays=initial, num_rounds=3, timeout=settings.round_timeout,
                  train_config=config, evaluate_config=config, evaluate_fn=network)
        assert state.deactivate_node(gone)  # gone again, now for good
        both = SiteStrategy(recorder=recorder, reference=initial, required_sites=2, experiment="both",
                          node_wait_seconds=settings.node_wait_seconds)
        start = time.monotonic()
        try:
            both.start(grid=sites.named("both"), initial_arrays=initial, num_rounds=1, timeout=settings.round_timeout,
                       train_config=config, evaluate_config=config)
        except FederationError as error:
            outcome["error"] = str(error)
        outcome["seconds"] = time.monotonic() - start

    return app


@pytest.fixture(scope="module")
def disconnected_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deadlines")
    folders = phantom_sites(root / "sites", 2)
    settings = RunSettings(num_rounds=3, num_sites=2, min_sites=1, local_steps=4, batch_size=4, patch_size=32,
                           eval_max_slices=4, node_wait_seconds=2.0, round_timeout=300.0, run_dir=str(root / "run"))
    Path(settings.run_dir).mkdir()
    outcome: dict = {}
    run_simulation(
        server_app=disconnecting_server_app(settings, outcome),
        client_app=build_client_app([str(folder) for folder in folders]),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    run_dir = Path(settings.run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sent = [json.loads(line) for line in (run_dir / "messages.jsonl").read_text().splitlines()]
    return rows, sent, outcome, sorted(folder.name for folder in folders)


@pytest.mark.slow
def test_the_rounds_go_on_without_a_disconnected_site_and_take_it_back(disconnected_run):
    rows, sent, _outcome, names = disconnected_run
    trained = [(r["round"], r["site"]) for r in rows if r["experiment"] == "global" and r["phase"] == "train"]
    assert trained == [(1, names[0]), (1, names[1]), (2, names[0]), (3, names[0]), (3, names[1])]
    evaluated = {(r["round"], r["site"]) for r in rows if r["experiment"] == "global" and r["phase"] == "evaluate"}
    assert evaluated == {(1, names[0]), (1, names[1]), (2, names[0]), (3, names[0]), (3, names[1])}
    to_gone = [m["type"] for m in sent if m["part"] == "global" and m["site"] == names[1]]
    assert to_gone == ["train", "evaluate", "train", "evaluate"]  # nothing was sent to it while it was away


@pytest.mark.slow
def test_a_federation_that_needs_a_gone_site_stops_at_the_deadline_naming_it(disconnected_run):
    rows, _sent, outcome, names = disconnected_run
    assert f"missing: {names[1]}" in outcome["error"] and "Start the SuperNodes" in outcome["error"]
    assert 2.0 <= outcome["seconds"] < 30
    assert not [r for r in rows if r["experiment"] == "both"]


# ------------------------------------------------------------- real SuperLink and SuperNodes on 127.0.0.1 (slow)
def wait_for_row(run_dir: Path, fed: LocalFederation, wanted, timeout: float = 600) -> None:
    """Wait until ``run_dir/metrics.jsonl`` has a row for which ``wanted(row)`` holds."""
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (path.exists() and any(wanted(json.loads(line)) for line in path.read_text().splitlines())):
        assert time.monotonic() < deadline, f"no such row after {timeout:g} s\n{fed.log_tails()}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A SuperLink with TLS and node authentication, and one SuperNode for each of two phantom sites."""
    root = tmp_path_factory.mktemp("deployment")
    folders = phantom_sites(root / "sites", 2)
    with LocalFederation(root / "federation", ["a", "b"]) as fed:
        for key, folder in zip("ab", folders):
            fed.start_supernode(key, folder)
        fed.wait_for_nodes(2, timeout=180)
        yield fed, root, folders
    # leaving the block ended every SuperNode, the SuperLink and all they started, by pid


def site_rows(run_dir: Path, phase: str) -> dict[int, list[str]]:
    """round -> the sites with a ``phase`` row in that round (experiment ``global``)."""
    rounds: dict[int, list[str]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["experiment"] == "global" and row["phase"] == phase:
            rounds.setdefault(row["round"], []).append(row["site"])
    return rounds


#: The rejoin test's run settings (the resume test repeats them, to compare with its run).
REJOIN = {"num-sites": 2, "min-sites": 1, "node-wait-seconds": 240.0}


@pytest.mark.slow
def test_a_site_whose_supernode_restarts_is_waited_for_and_trains_again(deployment):
    fed, root, folders = deployment
    names = [folder.name for folder in folders]
    run_dir = root / "rejoin"
    run_id = fed.start_run(tiny_run_config(run_dir, **REJOIN))
    wait_for_row(run_dir, fed, lambda row: row["phase"] == "train" and row["site"] == names[1])
    fed.supernodes["b"].stop()  # SIGTERM: the SuperNode says goodbye and its node goes offline at once
    fed.start_supernode("b", folders[1], register=False)  # the hospital restarts it: same key, same node
    row = fed.wait_for_run(run_id, timeout=900)
    assert row["status"] == "finished:completed", fed.log_tails()
    trained = site_rows(run_dir, "train")
    assert trained == {1: names, 2: names}  # site-2 trained before and after its restart (2 rounds)
    assert len(fed.nodes()) == 2  # it came back as the node it was, not as a new one


@pytest.mark.slow
def test_a_supernode_killed_mid_round_leaves_the_run_to_finish_without_it_and_named(deployment):
    fed, root, folders = deployment
    names = [folder.name for folder in folders]
    fed.wait_for_nodes(2, timeout=180)
    run_dir = root / "killed"
    run_id = fed.start_run(tiny_run_config(run_dir, **{"num-sites": 2, "min-sites": 1, "node-wait-seconds": 5.0}))
    wait_for_row(run_dir, fed, lambda row: row["round"] == 0 and row["site"] == names[1])
    fed.kill_supernode("b")  # SIGKILL right after round 0: its round-1 training is under way; no goodbye
    row = fed.wait_for_run(run_id, timeout=600)
    assert row["status"] == "finished:completed", fed.log_tails()
    trained = site_rows(run_dir, "train")
    assert trained == {1: [names[0]], 2: [names[0]]}  # round 1 completed without it, round 2 went on
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["missing_sites"] == {names[1]: 0}  # named, with the last round it was scored in
    fed.start_supernode("b", folders[1], register=False)  # back for the next test


@pytest.mark.slow
def test_a_run_whose_superlink_stops_resumes_to_the_weights_of_a_run_never_stopped(deployment):
    """The coordinator's machine goes down mid-run (SuperLink and ServerApp ended by pid); after it restarts on
    the same database, ``resume`` in the run config continues the run folder from its last completed round.

    The run never stopped is the rejoin test's (same settings; there a SuperNode restarted between rounds, which
    changes no computation), so that this test needs no third run."""
    import torch

    fed, root, folders = deployment
    never_stopped = root / "rejoin" / "final_model.pt"
    assert never_stopped.is_file(), "the rejoin test runs first, in this module's order"
    fed.wait_for_nodes(2, timeout=180)
    stopped = root / "stopped"
    fed.start_run(tiny_run_config(stopped, **REJOIN))
    wait_for_row(stopped, fed, lambda row: row["round"] == 1 and row["phase"] == "evaluate")  # round 1 kept
    fed.restart_superlink()
    fed.wait_for_nodes(2, timeout=180)  # the SuperNodes reconnect by themselves
    resumed = fed.start_run(tiny_run_config(stopped, resume=True, **REJOIN))
    status = fed.wait_for_run(resumed, timeout=600)["status"]
    log = fed.flwr("log", str(resumed), fed.name, "--show").stdout
    assert status == "finished:completed", log[-4000:] + fed.log_tails()
    assert "going on after round 1 of 2" in log, log
    ours = torch.load(stopped / "final_model.pt", weights_only=True)
    theirs = torch.load(never_stopped, weights_only=True)
    assert ours["extra"]["round"] == theirs["extra"]["round"] == 2
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, weights in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], weights), key


@pytest.mark.slow
def test_a_site_that_never_comes_back_ends_the_run_at_the_deadline_with_its_name(deployment):
    fed, root, folders = deployment
    names = [folder.name for folder in folders]
    fed.wait_for_nodes(2, timeout=180)
    run_dir = root / "gone"
    run_id = fed.start_run(tiny_run_config(run_dir, **{"num-sites": 2, "min-sites": 2, "node-wait-seconds": 5.0}))
    wait_for_row(run_dir, fed, lambda row: row["phase"] == "train" and row["site"] == names[1])
    for key in [key for key in fed.supernodes if key.startswith("b")]:
        fed.supernodes[key].stop()  # for good
    stopped = time.monotonic()
    row = fed.wait_for_run(run_id, timeout=300)
    assert row["status"] == "finished:failed"
    assert time.monotonic() - stopped < 120  # the deadline (5 s) and Flower's own bookkeeping, not forever
    log = fed.flwr("log", str(run_id), fed.name, "--show").stdout
    # whether its round's message was out already (no usable reply) or not yet (missing at sampling): named, with
    # what to do
    assert re.search(rf"FederationError: round \d+ (train|evaluate): only 1 of .*{re.escape(names[1])}", log), log
    assert "min-sites" in log and "SuperNode" in log
