"""Flower's strategies wrapped by fedsr (server/strategies.py): each moves the weights as its rule says (checked
against numpy on the same replies), keeps its state through a round checkpoint, receives exactly the sampled sites,
and is composed with the reply checks, float16 transfer and fraction sampling. Then one real federation on Flower's
simulation engine: a FedAdam run stopped after round 1 and resumed ends bit-identical to a run never stopped, and
every other strategy completes a 3-site x 2-round federation."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum
from flwr.simulation import run_simulation
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID, TaskType
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid
from scipy.stats import trim_mean

from client.app import build_client_app
from server.app import wait_for_sites
from server.checkpoint import LAST, read_round, write_global
from server.federation import train_federated
from server.run_log import RunRecorder
from server.settings import STRATEGIES, RunSettings
from server.sites import SiteGrid, SiteInfo, describe_sites
from server.strategies import SiteStrategy, flower_strategy, sample_size
from shared_models.registry import build_from_settings, family
from simulation.phantoms import write_phantom_sites

FAMILY = "srcnn"
TINY = {"model": FAMILY, "num_rounds": 2, "num_sites": 3, "min_sites": 2, "local_steps": 2, "batch_size": 2,
        "patch_size": 16, "eval_max_slices": 2, "evaluate_round_zero": False, "baselines": "none"}
#: Each strategy's own settings, changed from their defaults so that a test sees them act.
OWN = {"fedavg": {}, "fedprox": {"proximal_mu": 0.5}, "fedadam": {"server_learning_rate": 0.05},
       "fedyogi": {"server_learning_rate": 0.05}, "fedmedian": {}, "fedtrimmedavg": {"trim_fraction": 0.25},
       "krum": {"krum_byzantine": 1}}


def settings_for(strategy: str, **changes) -> RunSettings:
    return RunSettings(**{**TINY, "strategy": strategy, **OWN[strategy], **changes})


def global_weights(settings: RunSettings) -> dict[str, np.ndarray]:
    model = build_from_settings(settings)
    return {k: v.numpy() for k, v in family(FAMILY).shared_state(model, settings.family_options).items()}


def as_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in weights.items()})


def moved(weights: dict[str, np.ndarray], seed: int, step: float = 0.01) -> dict[str, np.ndarray]:
    """``weights`` after a site's round: a small step of its own."""
    rng = np.random.default_rng(seed)
    return {k: (v + step * rng.normal(size=v.shape)).astype(np.float32) for k, v in weights.items()}


def train_reply(sent: Message, name: str, weights: dict[str, np.ndarray], examples: float = 10) -> Message:
    metrics = {"num-examples": examples, "train-loss": 0.1, "train-patches": 4, "train-seconds": 0.1,
               "skipped-files": 0}
    return Message(RecordDict({"arrays": as_record(weights), "metrics": MetricRecord(metrics),
                               "site": ConfigRecord({"name": name})}), reply_to=sent)


class LinkedSites:
    """Sites registered and online in the SuperLink's in-memory link state (a real Flower grid), seen through the
    run's SiteGrid; ``about``: what each site said of itself."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, about: dict[str, dict]) -> None:
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        state = factory.state()
        run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                                  TaskType.SERVER_APP)
        grid = InMemoryGrid(factory)
        run = state.get_run_info(run_ids=[run_id])[0]
        grid.set_run(run)
        # Messages take their run from the process's task identity, which a ServerApp process sets at its start.
        monkeypatch.setattr(TaskIdentity, "_task_id", run.primary_task_id)
        monkeypatch.setattr(TaskIdentity, "_run_id", run_id)
        monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
        sites = []
        for name, said in about.items():
            node = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), heartbeat_interval=1)
            assert state.acknowledge_node_heartbeat(node, 600.0)
            sites.append(SiteInfo(node, name, said))
        self.grid = SiteGrid(grid, sites, "global", tmp_path / "messages.jsonl")

    def names(self, messages) -> list[str]:
        return [self.grid.sites[msg.metadata.dst_node_id].name for msg in messages]


@pytest.fixture
def three(tmp_path, monkeypatch) -> LinkedSites:
    return LinkedSites(tmp_path, monkeypatch, {f"site-{c}": {"train_examples": 50} for c in "abc"})


def wrapped(settings: RunSettings, sites: LinkedSites, tmp_path: Path, reference: dict) -> SiteStrategy:
    return SiteStrategy.for_run(settings, sites.grid, recorder=RunRecorder(tmp_path), reference=as_record(reference),
                                experiment="global")


def a_round(strategy: SiteStrategy, sites: LinkedSites, server_round: int, current: dict,
            updates: dict[str, dict]) -> ArrayRecord:
    """One train round of ``strategy`` from the global weights ``current``: each site replies with its update."""
    config = ConfigRecord({"server-round": server_round})
    messages = list(strategy.configure_train(server_round, as_record(current), config, sites.grid))
    replies = [train_reply(msg, name, updates[name]) for msg, name in zip(messages, sites.names(messages))]
    arrays, _metrics = strategy.aggregate_train(server_round, replies)
    return arrays


# ----------------------------------------------------------------------------------------------- which strategy
def test_each_strategy_is_flowers_with_the_runs_settings():
    kinds = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedmedian": FedMedian,
             "fedtrimmedavg": FedTrimmedAvg, "krum": Krum}
    assert set(kinds) == set(STRATEGIES)
    for name, kind in kinds.items():
        inner = flower_strategy(settings_for(name), required_sites=2)
        assert type(inner) is kind
    assert flower_strategy(settings_for("fedprox"), 2).proximal_mu == 0.5
    adam = flower_strategy(settings_for("fedadam", server_beta1=0.8, server_tau=0.01), 2)
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau) == (0.05, 0.8, 0.99, 0.01)
    assert flower_strategy(settings_for("fedtrimmedavg"), 2).beta == 0.25
    assert flower_strategy(settings_for("krum"), 2).num_malicious_nodes == 1


def test_a_strategy_setting_for_another_strategy_is_refused():
    with pytest.raises(ValueError, match="proximal-mu acts only with strategy = 'fedprox', not 'fedavg'"):
        RunSettings(proximal_mu=0.5)
    with pytest.raises(ValueError, match="fraction-train must be <= 1"):
        RunSettings(fraction_train=1.5)


# ------------------------------------------------------------------------------ robust rules against numpy
def four_updates(reference: dict) -> list[dict[str, np.ndarray]]:
    """Four sites' weights, one of them far from the others (a poisoned site)."""
    return [moved(reference, 1), moved(reference, 2), moved(reference, 3), moved(reference, 4, step=0.5)]


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategies_aggregate_as_their_rule_computed_with_numpy(tmp_path, three, name):
    settings = settings_for(name, update_norm_limit=0.0)  # the norm rule would drop the poisoned site first
    reference = global_weights(settings)
    updates = four_updates(reference)
    sent = Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=1)
    replies = [train_reply(sent, f"site-{i}", update) for i, update in enumerate(updates)]
    strategy = SiteStrategy(flower_strategy(settings, 2), recorder=RunRecorder(tmp_path),
                            reference=as_record(reference), required_sites=2, experiment="global",
                            node_wait_seconds=0)
    arrays, _ = strategy.aggregate_train(1, replies)
    stacked = {key: np.stack([update[key] for update in updates]) for key in reference}
    if name == "fedmedian":
        expected = {key: np.median(values, axis=0) for key, values in stacked.items()}
    elif name == "fedtrimmedavg":  # scipy's trimmed mean: 25 % of 4 values = one cut from each end
        expected = {key: trim_mean(values, 0.25, axis=0) for key, values in stacked.items()}
    else:  # Krum, f = 1: the update whose n - f - 2 = 1 nearest others are nearest
        flat = np.stack([np.concatenate([u[key].ravel() for key in reference]) for u in updates]).astype(np.float64)
        distances = ((flat[:, None] - flat[None]) ** 2).sum(axis=2)
        scores = [np.sort(np.delete(row, i))[:1].sum() for i, row in enumerate(distances)]
        expected = updates[int(np.argmin(scores))]
    for key in reference:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-5, atol=1e-7)
        assert not np.allclose(arrays[key].numpy(), np.mean(stacked[key], axis=0))  # not the plain average


def adam_step(name: str, settings: RunSettings, current: dict, average: dict, server_round: int) -> dict:
    """The first server-optimiser step of Reddi et al. (FedAdam: Flower's bias-corrected learning rate; FedYogi:
    none) from moments at zero, as Flower's strategies take it."""
    b1, b2, eta, tau = settings.server_beta1, settings.server_beta2, settings.server_learning_rate, settings.server_tau
    out = {}
    for key, x in current.items():
        delta = average[key].astype(np.float64) - x
        m, v = (1 - b1) * delta, (1 - b2) * delta ** 2  # Yogi's sign(0 - delta^2) = -1 gives the same first v
        rate = eta
        if name == "fedadam":
            rate *= np.sqrt(1 - b2 ** (server_round + 1)) / (1 - b1 ** (server_round + 1))
        out[key] = x + rate * m / (np.sqrt(v) + tau)
    return out


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimisers_step_as_their_rule_and_resume_from_a_checkpoint_exactly(tmp_path, three, name):
    settings = settings_for(name, run_dir=str(tmp_path))
    current = global_weights(settings)
    updates = [{f"site-{c}": moved(current, 10 * r + i) for i, c in enumerate("abc")} for r in (1, 2)]
    unstopped = wrapped(settings, three, tmp_path, current)
    first = a_round(unstopped, three, 1, current, updates[0])
    average = {key: np.mean([u[key] for u in updates[0].values()], axis=0) for key in current}
    for key, value in adam_step(name, settings, current, average, 1).items():
        np.testing.assert_allclose(first[key].numpy(), value, rtol=1e-4, atol=1e-6)

    model = build_from_settings(settings)
    write_global(tmp_path, model, first, settings=settings, normalisation={}, name=LAST, round_=1,
                 experiment="global", strategy_state=unstopped.state())
    state = read_round(tmp_path / LAST)
    resumed = wrapped(settings, three, tmp_path, {k: v.numpy() for k, v in first.items()})
    resumed.restore(state.strategy)
    after = {k: v.numpy() for k, v in first.items()}
    whole, again = (a_round(s, three, 2, after, updates[1]) for s in (unstopped, resumed))
    fresh = a_round(wrapped(settings, three, tmp_path, after), three, 2, after, updates[1])
    for key in current:
        assert np.array_equal(whole[key].numpy(), again[key].numpy()), key
    assert any(not np.array_equal(whole[k].numpy(), fresh[k].numpy()) for k in current)  # the state mattered


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_non_finite_aggregate_is_not_adopted_and_the_strategy_state_stays(tmp_path, three):
    settings = settings_for("fedadam", update_norm_limit=0.0)
    current = {key: np.full_like(value, -3e38) for key, value in global_weights(settings).items()}
    huge = {key: np.full_like(value, 3e38) for key, value in current.items()}  # finite, but 6e38 from the global
    strategy = wrapped(settings, three, tmp_path, current)
    assert a_round(strategy, three, 1, current, {f"site-{c}": huge for c in "abc"}) is None
    assert strategy.inner.m_t is None and strategy.inner.v_t is None
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (rejected,) = [r for r in rows if r["phase"] == "rejected"]
    assert (rejected["site"], rejected["rule"]) == ("*", "aggregate")
    assert strategy.reference["extract.bias"].numpy()[0] == np.float32(-3e38)  # still the previous global


# ------------------------------------------------------------------------------------- what goes out, to whom
def test_fedprox_sends_its_mu_and_float16_transfer_sends_half_precision(tmp_path, three):
    settings = settings_for("fedprox", transfer_dtype="float16")
    current = global_weights(settings)
    messages = list(wrapped(settings, three, tmp_path, current).configure_train(
        1, as_record(current), ConfigRecord({}), three.grid))
    assert three.names(messages) == ["site-a", "site-b", "site-c"]
    for msg in messages:
        assert msg.content["config"]["proximal-mu"] == 0.5 and msg.content["config"]["server-round"] == 1
        for key, value in current.items():
            assert msg.content["arrays"][key].dtype == "float16"
            assert np.array_equal(msg.content["arrays"][key].numpy(), value.astype(np.float16))


def test_a_site_claiming_more_examples_than_it_described_is_rejected(tmp_path, three):
    settings = settings_for("fedavg")
    current = global_weights(settings)
    strategy = wrapped(settings, three, tmp_path, current)
    messages = list(strategy.configure_train(1, as_record(current), ConfigRecord({}), three.grid))
    claims = {"site-a": 50, "site-b": 51, "site-c": 20}  # each described 50 training examples
    replies = [train_reply(msg, name, moved(current, i), claims[name])
               for i, (msg, name) in enumerate(zip(messages, three.names(messages)))]
    strategy.aggregate_train(1, replies)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["site"], r["rule"]) for r in rows if r["phase"] == "rejected"] == [("site-b", "num-examples")]


def test_fractions_sample_reproducibly_by_seed_and_round(tmp_path, monkeypatch):
    sites = LinkedSites(tmp_path, monkeypatch, {f"site-{i}": {} for i in range(6)})
    assert sample_size(0.4, 6, 2) == 2 and sample_size(0.1, 6, 2) == 2 and sample_size(1.0, 6, 2) == 6

    def picks(seed: int, server_round: int, phase: str) -> list[str]:
        settings = settings_for("fedavg", num_sites=6, fraction_train=0.5, fraction_evaluate=0.34, seed=seed)
        strategy = wrapped(settings, sites, tmp_path, {})
        return [sites.grid.sites[n].name for n in strategy.sample_sites(sites.grid, server_round, phase)]

    rounds = [picks(0, r, MessageType.TRAIN) for r in range(1, 6)]
    assert all(len(p) == 3 and p == sorted(p) for p in rounds)
    assert rounds == [picks(0, r, MessageType.TRAIN) for r in range(1, 6)]  # a resumed run draws the same
    assert len({tuple(p) for p in rounds}) > 1  # ... and the rounds differ
    assert rounds != [picks(1, r, MessageType.TRAIN) for r in range(1, 6)]
    assert len(picks(0, 1, MessageType.EVALUATE)) == 2


# --------------------------------------------------------------------------- real federations, one Ray for all
def strategy_sweep_app(settings: RunSettings, finals: dict) -> ServerApp:
    """A ServerApp that runs, over the same sites: FedAdam for two rounds; FedAdam for one round, then resumed
    from its checkpoint for the second; then every other strategy for two rounds. ``finals`` gets each final
    weights (``fedadam``, ``fedadam-resumed``, STRATEGY) and the initial ones (``initial``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        root = Path(settings.run_dir)
        sites = describe_sites(grid, wait_for_sites(grid, settings), ConfigRecord(settings.round_config()),
                               settings.round_timeout, root / "messages.jsonl")
        model = build_from_settings(settings)
        finals["initial"] = ArrayRecord(family(FAMILY).shared_state(model, settings.family_options))

        def federation(name: str, rounds: int, run: str, resumed=None) -> ArrayRecord:
            chosen = settings.replace(strategy=name, num_rounds=rounds, run_dir=str(root / run), **OWN[name])
            (root / run).mkdir(exist_ok=True)
            return train_federated(sites.named(run), chosen, model, finals["initial"], RunRecorder(root / run),
                                   experiment="global", round_zero=False, checkpoint=LAST, resumed=resumed)

        finals["fedadam"] = federation("fedadam", 2, "fedadam")
        federation("fedadam", 1, "fedadam-stopped")
        finals["fedadam-resumed"] = federation("fedadam", 2, "fedadam-stopped",
                                               read_round(root / "fedadam-stopped" / LAST))
        for name in STRATEGIES:
            if name != "fedadam":
                finals[name] = federation(name, 2, name)

    return app


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    folders = write_phantom_sites(root / "sites", n_sites=3, subjects_per_site=3, shape=(32, 32, 16), seed=5)
    settings = RunSettings(**TINY, run_dir=str(root / "runs"), sites_dir=str(root / "sites"))
    Path(settings.run_dir).mkdir()
    finals: dict[str, ArrayRecord] = {}
    run_simulation(
        server_app=strategy_sweep_app(settings, finals),
        client_app=build_client_app([str(folder) for folder in folders]),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    return Path(settings.run_dir), finals


def test_a_resumed_fedadam_run_ends_bit_identical_to_one_never_stopped(sweep):
    runs, finals = sweep
    assert read_round(runs / "fedadam-stopped" / LAST).round == 2
    whole, resumed = finals["fedadam"].to_torch_state_dict(), finals["fedadam-resumed"].to_torch_state_dict()
    assert whole.keys() == resumed.keys()
    for key, weights in whole.items():
        assert torch.equal(resumed[key], weights), key


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_completes_three_sites_by_two_rounds_with_every_reply_used(sweep, name):
    runs, finals = sweep
    initial = finals["initial"].to_torch_state_dict()
    final = finals[name].to_torch_state_dict()
    assert all(torch.isfinite(value).all() for value in final.values())
    assert any(not torch.equal(final[key], initial[key]) for key in initial)
    rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["phase"] == "rejected"]  # the sites' real replies pass every rule
    assert sorted((r["round"], r["phase"]) for r in rows) == sorted(
        (r, phase) for r in (1, 2) for phase in ("train", "evaluate") for _site in range(3))
