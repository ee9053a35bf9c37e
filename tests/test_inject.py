"""Fault injection in simulation (``fedsr simulate --inject SITE:KIND``, simulation/inject.py): the specs it takes
and refuses, each kind's corruption on real Flower messages through a real ClientApp, and (slow) one federation
with four faulty sites and an honest one, where every faulty site's fate shows in the run's record."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from typer.testing import CliRunner

import simulation.cli as simulate_cli
from server.run_log import read_run_config, write_run_config
from server.settings import RunSettings
from shared_models.checkpoint import load_checkpoint
from shared_models.cli import app as root_app
from simulation.inject import (
    INJECTIONS_FILE, Injection, InjectionMod, assign, parse_injection, read_injections, write_injections,
)
from simulation.phantoms import write_phantom_sites


# ------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("spec, site, kind, value", [
    ("site-1:nan", "site-1", "nan", None),
    ("site-1:random", "site-1", "random", None),
    ("site-1:scale:100", "site-1", "scale", 100.0),
    ("site-1:scale:-0.5", "site-1", "scale", -0.5),
    ("site-1:examples:1e12", "site-1", "examples", 1e12),
    ("site-1:examples:-3", "site-1", "examples", -3.0),
    ("site-1:drop", "site-1", "drop", 1.0),
    ("site-1:drop:3", "site-1", "drop", 3.0),
    ("Hôpital: nord:nan", "Hôpital: nord", "nan", None),  # a site.toml name may hold ':' and spaces
])
def test_each_kind_is_parsed_and_its_spec_reads_back_the_same(spec, site, kind, value):
    injection = parse_injection(spec)
    assert injection == Injection(site, kind, value)
    assert parse_injection(injection.spec) == injection
    assert injection.site in injection.spec and injection.effect


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e300"])
def test_examples_takes_any_number_even_one_no_validation_should_accept(text):
    injection = parse_injection(f"s:examples:{text}")
    assert injection.value == pytest.approx(float(text), nan_ok=True)
    assert math.isnan(injection.value) == (text == "nan")
    again = parse_injection(injection.spec).value
    assert again == injection.value or (math.isnan(again) and math.isnan(injection.value))


@pytest.mark.parametrize("spec, says", [
    ("site-1", "no fault kind"),
    ("site-1:explode", "no fault kind"),
    (":nan", "no site named"),
    ("site-1:scale", "scale needs a value"),
    ("site-1:examples", "examples needs a value"),
    ("site-1:scale:big", "must be a number"),
    ("site-1:scale:inf", "must be finite"),
    ("site-1:nan:3", "nan takes no value"),
    ("site-1:random:1", "random takes no value"),
    ("site-1:drop:0", "whole number >= 1"),
    ("site-1:drop:1.5", "whole number >= 1"),
])
def test_a_bad_spec_is_refused_with_the_spec_and_the_problem_named(spec, says):
    with pytest.raises(ValueError) as refused:
        parse_injection(spec)
    message = str(refused.value)
    assert repr(spec) in message and says in message


def site_folder(root: Path, folder: str, name: str | None = None) -> str:
    """A site folder holding only its site.toml (with ``name`` when given): enough to be named."""
    (root / folder).mkdir(parents=True)
    (root / folder / "site.toml").write_text(f'name = "{name}"\n' if name else "")
    return str(root / folder)


def test_sites_are_found_by_site_toml_name_or_folder_and_unknown_ones_are_refused_listing_the_sites(tmp_path):
    folders = [site_folder(tmp_path, "a-folder", "north"), site_folder(tmp_path, "b-folder")]
    faults = assign([parse_injection("north:nan"), parse_injection("a-folder:drop:2"),
                     parse_injection("b-folder:scale:3")], folders)
    assert faults == {0: (Injection("north", "nan"), Injection("north", "drop", 2.0)),
                      1: (Injection("b-folder", "scale", 3.0),)}  # named by site.toml name, as the run names them
    with pytest.raises(ValueError, match=r"no site 'south' in this run; its sites are north, b-folder"):
        assign([parse_injection("south:nan")], folders)
    with pytest.raises(ValueError, match="has a scale fault already"):
        assign([parse_injection("north:scale:2"), parse_injection("a-folder:scale:5")], folders)


def test_the_record_reads_back_what_was_written(tmp_path):
    faults = [Injection("north", "examples", float("inf")), Injection("b", "drop", 2.0), Injection("c", "random")]
    path = write_injections(tmp_path, faults)
    assert path == tmp_path / INJECTIONS_FILE and json.loads(path.read_text())["simulation_only"] is True
    assert read_injections(tmp_path) == faults
    assert read_injections(tmp_path / "elsewhere") == []


# ----------------------------------------------------------------------------- the mod on real messages
RECEIVED = {"conv.weight": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 1, 3, 4),
            "conv.bias": np.array([0.5, -0.25], dtype=np.float16),
            "steps": np.array([7], dtype=np.int64)}
DELTA = 0.125  # what the site's "training" adds to every floating weight


def instruction(message_type: str, server_round: int | None, node: int) -> Message:
    """The coordinator's message as the SuperNode hands it to the ClientApp: the global weights and the config."""
    config = ConfigRecord({} if server_round is None else {"server-round": server_round})
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in RECEIVED.items()}), "config": config})
    metadata = Metadata(run_id=1, message_id=f"m-{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=content, metadata=metadata)


def honest_site_app(*mods) -> tuple[ClientApp, list[str]]:
    """A real ClientApp whose handlers reply as a site does: train: the received weights + DELTA (integers kept)
    and num-examples 40; evaluate and evaluate.cross: psnr 31.5 and ssim 0.9; query.describe: its name. Returns it
    and the list of message types its handlers ran for."""
    app, handled = ClientApp(mods=list(mods)), []

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        handled.append(msg.metadata.message_type)
        trained = {k: Array(v + np.asarray(DELTA, v.dtype) if v.dtype.kind == "f" else v) for k, v in RECEIVED.items()}
        content = {"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": 40})}
        return Message(RecordDict(content), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        handled.append(msg.metadata.message_type)
        metrics = MetricRecord({"psnr": 31.5, "ssim": 0.9, "num-examples": 12})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    app.evaluate("cross")(evaluate)  # the cross-site evaluation, after the last round

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        handled.append(msg.metadata.message_type)
        return Message(RecordDict({"site": ConfigRecord({"name": "north"})}), reply_to=msg)

    return app, handled


def context(partition: int) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition}, state=RecordDict(),
                   run_config={})


def weights(reply: Message) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in reply.content["arrays"].items()}


def exchange(spec: str, message_type: str = MessageType.TRAIN, server_round: int | None = 2,
             partition: int = 0) -> tuple[Message, Message, list[str]]:
    """Site 0 carries the fault ``spec``; the message goes to ``partition``. Returns (the faulty site's reply,
    the same message's reply from an app without the mod, the handlers that ran)."""
    app, handled = honest_site_app(InjectionMod({0: [parse_injection(spec)]}))
    clean_app, _ = honest_site_app()
    msg = instruction(message_type, server_round, 100 + partition)
    return app(msg, context(partition)), clean_app(msg, context(partition)), handled


def test_nan_makes_every_floating_weight_nan_and_the_evaluation_psnr_nan():
    reply, clean, _ = exchange("north:nan")
    got = weights(reply)
    assert np.isnan(got["conv.weight"]).all() and np.isnan(got["conv.bias"]).all()
    assert got["conv.bias"].dtype == np.float16 and got["conv.weight"].shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(got["steps"], RECEIVED["steps"])  # an integer buffer keeps its values
    assert dict(reply.content["metrics"]) == dict(clean.content["metrics"])
    evaluated, clean, _ = exchange("north:nan", MessageType.EVALUATE)
    metrics = dict(evaluated.content["metrics"])
    assert math.isnan(metrics.pop("psnr")) and metrics == {"ssim": 0.9, "num-examples": 12}


def test_scale_moves_the_weights_f_times_as_far_from_the_global_ones():
    reply, clean, _ = exchange("north:scale:100")
    got, honest = weights(reply), weights(clean)
    for key in ("conv.weight", "conv.bias"):
        expected = RECEIVED[key].astype(np.float64) + 100 * (honest[key].astype(np.float64) - RECEIVED[key])
        np.testing.assert_allclose(got[key], expected.astype(got[key].dtype), rtol=1e-3)
        assert got[key].dtype == RECEIVED[key].dtype
    np.testing.assert_array_equal(got["steps"], RECEIVED["steps"])


def test_random_replaces_the_weights_by_standard_normal_noise_the_same_in_a_rerun():
    reply, clean, _ = exchange("north:random")
    got = weights(reply)
    for key in ("conv.weight", "conv.bias"):
        assert got[key].shape == RECEIVED[key].shape and got[key].dtype == RECEIVED[key].dtype
        assert not np.allclose(got[key], weights(clean)[key])
    noise = np.concatenate([got["conv.weight"].ravel(), got["conv.bias"].astype(np.float32)])
    assert abs(noise.mean()) < 0.6 and 0.5 < noise.std() < 1.6  # 26 draws of N(0, 1)
    again, _, _ = exchange("north:random")
    np.testing.assert_array_equal(weights(again)["conv.weight"], got["conv.weight"])
    other_round, _, _ = exchange("north:random", server_round=3)
    assert not np.array_equal(weights(other_round)["conv.weight"], got["conv.weight"])


@pytest.mark.parametrize("text", ["1e12", "nan", "-1"])
def test_examples_sets_num_examples_and_nothing_else(text):
    reply, clean, _ = exchange(f"north:examples:{text}")
    count = reply.content["metrics"]["num-examples"]
    assert count == pytest.approx(float(text), nan_ok=True)
    for key, value in weights(clean).items():
        np.testing.assert_array_equal(weights(reply)[key], value)
    evaluated, clean, _ = exchange(f"north:examples:{text}", MessageType.EVALUATE)
    assert dict(evaluated.content["metrics"]) == dict(clean.content["metrics"])  # train replies only


def test_drop_answers_from_its_round_on_with_node_unavailable_without_running_the_handler():
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE, "evaluate.cross"):
        reply, _, handled = exchange("north:drop:2", message_type, server_round=2)
        assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
        assert "north:drop:2" in reply.error.reason and handled == []
    before, clean, handled = exchange("north:drop:2", server_round=1)
    assert not before.has_error() and handled == [MessageType.TRAIN]
    np.testing.assert_array_equal(weights(before)["conv.weight"], weights(clean)["conv.weight"])
    app, handled = honest_site_app(InjectionMod({0: [parse_injection("north:drop")]}))
    described = app(instruction("query.describe", None, 100), context(0))  # no round: the site still says who it is
    assert not described.has_error() and handled == ["query.describe"]


@pytest.mark.parametrize("spec", ["north:nan", "north:scale:100", "north:random", "north:examples:1e12",
                                  "north:drop"])
def test_the_other_sites_replies_pass_untouched(spec):
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        reply, clean, _ = exchange(spec, message_type, partition=1)
        assert not reply.has_error()
        assert dict(reply.content["metrics"]) == dict(clean.content["metrics"])
        if message_type == MessageType.TRAIN:
            for key, value in weights(clean).items():
                np.testing.assert_array_equal(weights(reply)[key], value)


def test_a_refusal_passes_untouched():
    app = ClientApp(mods=[InjectionMod({0: [parse_injection("north:nan"), parse_injection("north:examples:5")]})])
    refusal = RecordDict({"refusal": ConfigRecord({"category": "policy", "reason": "no"})})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(refusal, reply_to=msg)

    reply = app(instruction(MessageType.TRAIN, 1, 100), context(0))
    assert set(reply.content) == {"refusal"} and dict(reply.content["refusal"]) == dict(refusal["refusal"])


# ------------------------------------------------------------------------------------------ the command
def invoke(*args: str):
    return CliRunner().invoke(root_app, list(args), env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})


def test_simulate_refuses_an_unknown_site_or_a_bad_spec_before_the_run_starts(tmp_path):
    site_folder(tmp_path / "sites", "a-folder", "north")
    site_folder(tmp_path / "sites", "b-folder")
    run_dir = tmp_path / "run"
    result = invoke("simulate", "--sites-dir", str(tmp_path / "sites"), "--run-dir", str(run_dir),
                    "--inject", "north:nan", "--inject", "south:drop:2")
    assert result.exit_code == 2, result.output
    assert "no site 'south'" in result.output and "north, b-folder" in result.output
    result = invoke("simulate", "--sites-dir", str(tmp_path / "sites"), "--run-dir", str(run_dir),
                    "--inject", "north:scale")
    assert result.exit_code == 2 and "scale needs a value" in result.output
    assert not run_dir.exists()
    assert "--inject" in invoke("simulate", "--help").output


def test_resume_refuses_new_faults(tmp_path):
    write_run_config(tmp_path, RunSettings(run_dir=str(tmp_path)).to_config())
    result = invoke("simulate", "--resume", str(tmp_path), "--inject", "north:nan")
    said = result.output.replace("\n", "")  # the terminal wraps the long path anywhere
    assert result.exit_code == 2 and "leave out --inject" in said and INJECTIONS_FILE in said


# ------------------------------------------------------------------------------ a federation (slow)
#: Partition -> fault; the fifth site is honest (the norm rule compares each update with the others' median).
FAULTS = {0: "nan", 1: "scale:100", 2: "examples:1e12", 3: "drop:2"}
ARGS = ["--model", "srcnn", "--preset", "tiny", "--local-steps", "2", "--rounds", "2", "--baselines", "none",
        "--min-sites", "1", "--batch-size", "4", "--patch-size", "32",
        "--run-config", "evaluate-round-zero=false eval-max-slices=2"]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """Five tiny phantom sites, four of them faulty, two rounds of ``fedsr simulate``; returns (run folder, metrics
    rows, site names, terminal output)."""
    root = tmp_path_factory.mktemp("inject")
    sites = [p.name for p in write_phantom_sites(root / "sites", n_sites=5, subjects_per_site=3, shape=(32, 32, 16),
                                                 seed=5)]
    run_dir = root / "run"
    injected = [arg for partition, kind in FAULTS.items() for arg in ("--inject", f"{sites[partition]}:{kind}")]
    done = subprocess.run([sys.executable, "-m", "shared_models.cli", "simulate", "--sites-dir", str(root / "sites"),
                           "--run-dir", str(run_dir), *ARGS, *injected], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200"), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows, sites, done.stdout


@pytest.mark.slow
def test_the_poisoned_run_finishes_records_its_faults_and_keeps_them_out_of_the_settings(poisoned):
    run_dir, _rows, sites, out = poisoned
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    recorded = read_injections(run_dir)
    assert recorded == [parse_injection(f"{sites[partition]}:{kind}") for partition, kind in FAULTS.items()]
    for fault in recorded:
        assert f"fault injected at site {fault.site} ({fault.spec})" in out  # the warning on the terminal
        assert f"fault injected at site {fault.site} ({fault.spec})" in (run_dir / "flower.log").read_text()
    config = read_run_config(run_dir)  # no run setting: a real deployment never sees a fault
    assert set(config) == set(RunSettings().to_config())
    assert not [value for value in config.values() if any(fault.spec in str(value) for fault in recorded)]


@pytest.mark.slow
def test_the_honest_site_trains_every_round_and_the_global_model_stays_finite(poisoned):
    run_dir, rows, sites, _out = poisoned
    honest = sites[4]
    assert {r["round"] for r in rows if r["phase"] == "train" and r["site"] == honest} == {1, 2}
    (last,) = [r for r in rows if r["phase"] == "evaluate" and r["round"] == 2 and r["site"] == honest]
    assert math.isfinite(last["psnr"])
    model, meta = load_checkpoint(run_dir / "final_model.pt")
    assert meta["extra"]["round"] == 2 and all(bool(v.isfinite().all()) for v in model.state_dict().values())


@pytest.mark.slow
def test_a_dropped_site_trains_until_its_round_and_is_missing_after(poisoned):
    run_dir, rows, sites, _out = poisoned
    dropped = sites[3]
    assert {(r["round"], r["phase"]) for r in rows if r["site"] == dropped and r["phase"] != "rejected"} == {
        (1, "train"), (1, "evaluate")}
    assert json.loads((run_dir / "summary.json").read_text())["missing_sites"][dropped] == 1


# The three tests below assert the coordinator's validation (issue #10 part 1, server/): rows with phase
# "rejected" and their rule, as the contract between the parts defines them.
def rejected(rows: list[dict], site: str) -> set[tuple[int, str, str]]:
    return {(r["round"], r["request"], r["rule"]) for r in rows if r["phase"] == "rejected" and r["site"] == site}


@pytest.mark.slow
def test_nan_weights_and_a_nan_psnr_are_rejected_as_non_finite(poisoned):
    run_dir, rows, sites, _out = poisoned
    assert rejected(rows, sites[0]) == {(n, request, "non-finite") for n in (1, 2) for request in ("train", "evaluate")}
    assert not [r for r in rows if r["site"] == sites[0] and r["phase"] in ("train", "evaluate")]
    assert json.loads((run_dir / "summary.json").read_text())["missing_sites"][sites[0]] is None  # never scored


@pytest.mark.slow
def test_a_scaled_update_is_rejected_by_the_norm_rule(poisoned):
    _run_dir, rows, sites, _out = poisoned
    assert rejected(rows, sites[1]) == {(1, "train", "norm"), (2, "train", "norm")}


@pytest.mark.slow
def test_a_claim_of_1e12_examples_is_rejected_by_the_num_examples_rule(poisoned):
    _run_dir, rows, sites, _out = poisoned
    assert rejected(rows, sites[2]) == {(1, "train", "num-examples"), (2, "train", "num-examples")}


@pytest.mark.slow
def test_resume_goes_on_with_the_recorded_faults(poisoned, monkeypatch):
    run_dir, _rows, _sites, _out = poisoned
    followed = []
    monkeypatch.setattr(simulate_cli, "_follow", lambda *args: followed.append(args) or 1)  # the run is complete
    result = invoke("simulate", "--resume", str(run_dir))
    assert result.exit_code == 1, result.output
    ((_dir, _settings, faults),) = followed
    assert faults == read_injections(run_dir) and len(faults) == len(FAULTS)
