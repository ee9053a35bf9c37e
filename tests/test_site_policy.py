"""A site's ``[policy]``: what it accepts from the coordinator, and the refusal path from site to coordinator to report.

Parsing (safe defaults; a bad value names site.toml and the key), the checks by message type, the ClientApp's
refusal reply (no path in it, the detail in the site's log), and a real federation on Flower's simulation engine in
which one of three sites refuses the run's batch size: the run goes on with the other two, and the refusal is in the
coordinator's log, metrics.jsonl, summary.json, report.json and report.html.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.simulation import run_simulation

from client.app import build_client_app
from client.data.errors import SiteError
from client.data.siteconfig import SitePolicy, load_site_config, parse_site_config
from client.policy import POLICY, REFUSAL, SiteRefusal, check_policy
from client.sites_report import check_site_folder, print_site_report
from client.tasks.base import RoundJob
from server.app import build_server_app
from server.run_log import REFUSED
from server.settings import RunSettings
from shared_models.losses import LOSS_TERMS
from shared_models.registry import families
from simulation.phantoms import write_phantom_sites

SHAPE = (40, 40, 16)


def write_policy(site: Path, policy: str) -> None:
    """Replace the phantom site's ``[policy]`` table (the last table phantoms write) with ``policy``."""
    text = (site / "site.toml").read_text()
    head, found, _old = text.partition("[policy]")
    assert found, "phantom sites write a [policy] table"
    (site / "site.toml").write_text(f"{head}[policy]\n{policy}\n")


def job(**settings) -> RoundJob:
    """The RoundJob a site reads from the round config of a run with ``settings`` (``server_round``: the round)."""
    server_round = settings.pop("server_round", 1)
    config = {**RunSettings(**settings).round_config(), "server-round": server_round}
    return RoundJob.from_config(config, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------------ parsing
def test_defaults_are_safe_and_accept_the_default_run(tmp_path):
    policy = parse_site_config({}, tmp_path / "site.toml", "x").policy
    assert policy == SitePolicy()
    assert policy.min_batch_size > 1 and policy.min_local_steps > 1  # never one patch's gradient in one step
    assert policy.allowed_models is None and policy.allowed_losses is None  # every family and loss term
    defaults = RunSettings()
    assert policy.max_rounds >= defaults.num_rounds
    for message_type in ("train", "train.local", "evaluate", "evaluate.cross"):
        check_policy(policy, job(), message_type, "x")  # the default run is within a default site's policy


def test_a_policy_table_is_read_from_site_toml(tmp_path):
    (tmp_path / "site.toml").write_text(
        '[policy]\nmin_batch_size = 32\nmin_local_steps = 50\nmax_rounds = 20\n'
        'allowed_models = ["srcnn", "edsr", "srcnn"]\nallowed_losses = ["l1"]\n'
    )
    policy = load_site_config(tmp_path).policy
    assert policy == SitePolicy(min_batch_size=32, min_local_steps=50, max_rounds=20,
                                allowed_models=("srcnn", "edsr"), allowed_losses=("l1",))


@pytest.mark.parametrize("line, key", [
    ("min_batch_size = 0", "min_batch_size"),
    ('min_batch_size = "8"', "min_batch_size"),
    ("min_local_steps = -3", "min_local_steps"),
    ("max_rounds = 2.5", "max_rounds"),
    ("allowed_models = []", "allowed_models"),
    ('allowed_models = "edsr"', "allowed_models"),
    ('allowed_models = ["edrs"]', "allowed_models"),
    ('allowed_losses = ["l3"]', "allowed_losses"),
    ("min_batch = 8", "min_batch"),
])
def test_a_bad_policy_value_is_refused_naming_the_file_and_the_key(tmp_path, line, key):
    (tmp_path / "site.toml").write_text(f"[policy]\n{line}\n")
    with pytest.raises(SiteError) as raised:
        load_site_config(tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "site.toml") in message and key in message


def test_unknown_names_are_refused_with_the_names_this_installation_has(tmp_path):
    (tmp_path / "site.toml").write_text('[policy]\nallowed_losses = ["l1", "perceptual"]\n')
    with pytest.raises(SiteError) as raised:
        load_site_config(tmp_path)
    assert "'perceptual'" in raised.value.problem and all(term in raised.value.hint for term in LOSS_TERMS)


def test_sites_check_shows_the_policy(tmp_path):
    from rich.console import Console

    (site,) = write_phantom_sites(tmp_path, n_sites=1, subjects_per_site=3, shape=SHAPE)
    write_policy(site, 'min_batch_size = 12\nallowed_models = ["srcnn"]')
    console = Console(record=True, width=400)
    assert print_site_report(console, check_site_folder(site))
    text = console.export_text()
    assert "batch-size >= 12" in text and f"local-steps >= {SitePolicy().min_local_steps}" in text
    assert "models: srcnn" in text and "losses: any" in text
    assert "differential privacy required: no; budget: none" in text
    (site / "site.toml").write_text((site / "site.toml").read_text() + "\n[privacy]\nepsilon_budget = 6\n")
    console = Console(record=True, width=400)
    assert print_site_report(console, check_site_folder(site))
    assert "differential privacy required: yes; budget: epsilon 6 per patient at delta 1e-05" in console.export_text()


# ------------------------------------------------------------------------------------------------------- checks
def refusal(policy: SitePolicy, round_job: RoundJob, message_type: str = "train") -> SiteRefusal:
    with pytest.raises(SiteRefusal) as raised:
        check_policy(policy, round_job, message_type, "st-elsewhere")
    assert raised.value.category == POLICY and raised.value.site == "st-elsewhere"
    return raised.value


def test_a_batch_size_below_the_minimum_is_refused_for_training_only():
    policy = SitePolicy(min_batch_size=8)
    small = job(batch_size=4)
    for message_type in ("train", "train.local", "train.pooled"):
        reason = refusal(policy, small, message_type).reason
        assert "batch-size 4" in reason and "minimum of 8" in reason
    for message_type in ("evaluate", "evaluate.cross", "query.describe"):  # scoring sends no gradient
        check_policy(policy, small, message_type, "st-elsewhere")
    check_policy(policy, job(batch_size=8), "train", "st-elsewhere")  # the minimum itself is accepted


def test_a_disallowed_model_family_is_refused_for_training_and_scoring():
    others = sorted(set(families()) - {"edsr"})
    policy = SitePolicy(allowed_models=tuple(others))
    for message_type in ("train", "evaluate", "evaluate.cross", "train.local"):
        reason = refusal(policy, job(model="edsr"), message_type).reason
        assert "'edsr'" in reason and others[0] in reason
    check_policy(policy, job(model="edsr"), "query.describe", "st-elsewhere")  # a site always describes itself
    check_policy(policy, job(model=others[0]), "train", "st-elsewhere")


def test_steps_rounds_and_loss_terms_outside_the_policy_are_refused_together():
    policy = SitePolicy(min_local_steps=20, max_rounds=10, allowed_losses=("l1", "ssim"))
    reason = refusal(policy, job(local_steps=5, num_rounds=11, loss="l1:1,hfen:0.1,fft:0.1")).reason
    assert "local-steps 5" in reason and "minimum of 20" in reason
    assert "11 rounds" in reason and "maximum of 10" in reason
    assert "hfen, fft" in reason
    # a coordinator that announces few rounds cannot go past the maximum round by round
    assert "12 rounds" in refusal(policy, job(local_steps=20, num_rounds=5, server_round=12)).reason
    check_policy(policy, job(local_steps=20, num_rounds=10, server_round=10, loss="ssim"), "train", "x")


# ------------------------------------------------------------------------------------------ the ClientApp's reply
def message(message_type: str, config: dict) -> Message:
    """An instruction as the SuperNode hands it to the ClientApp (ids as the SuperLink sets them)."""
    metadata = Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=RecordDict({"config": ConfigRecord(config)}), metadata=metadata)


def strings(record_dict: RecordDict) -> list[str]:
    """Every text in a reply: record names, keys and string values."""
    found = []
    for name, record in record_dict.items():
        found.append(name)
        for key, value in record.items():
            found += [key, str(value)]
    return found


def test_the_client_app_replies_a_refusal_without_a_path_and_logs_the_detail(tmp_path, caplog):
    (site,) = write_phantom_sites(tmp_path / "hospital-DOE_JOHN", n_sites=1, subjects_per_site=3, shape=SHAPE)
    write_policy(site, 'allowed_models = ["srcnn"]')
    app = build_client_app([str(site)])
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    config = {**RunSettings(model="edsr", batch_size=16, patch_size=32).round_config(), "server-round": 1}

    with caplog.at_level(logging.WARNING, logger="client.policy"):
        reply = app(message("train", config), context)
    assert not reply.has_error() and set(reply.content) == {REFUSAL, "site"}  # no weights, no metrics
    assert dict(reply.content[REFUSAL])["category"] == POLICY
    assert "'edsr'" in reply.content[REFUSAL]["reason"] and "srcnn" in reply.content[REFUSAL]["reason"]
    assert dict(reply.content["site"]) == {"name": site.name}
    assert reply.metadata.reply_to_message_id == "m-1" and reply.metadata.message_type == "train"
    assert not [text for text in strings(reply.content) if str(tmp_path) in text or "DOE_JOHN" in text or "/" in text]
    (logged,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert site.name in logged and "batch-size 16" in logged  # the request's detail stays in the site's log

    described = app(message("query.describe", config), context)  # the site still says who it is
    assert not described.has_error() and "about" in described.content["site"]


# ------------------------------------------------------------------------------------------ a federation
@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three phantom sites; the first asks for batches of 8 patches, the run sends 4. min-sites 2."""
    root = tmp_path_factory.mktemp("policy")
    sites = write_phantom_sites(root / "sites", n_sites=3, subjects_per_site=3, shape=SHAPE, seed=4)
    write_policy(sites[0], "min_batch_size = 8")
    run_dir = root / "run"
    settings = RunSettings(
        num_rounds=2, num_sites=3, min_sites=2, local_steps=3, batch_size=4, patch_size=32, eval_max_slices=4,
        baselines="local", run_dir=str(run_dir), sites_dir=str(root / "sites"),
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("server")
    logger.addHandler(handler)
    try:
        run_simulation(
            server_app=build_server_app(settings),
            client_app=build_client_app([str(p) for p in sites]),
            num_supernodes=3,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
        )
    finally:
        logger.removeHandler(handler)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows, [r.getMessage() for r in records], sites


def test_the_site_refuses_and_the_run_completes_on_the_other_two(federation):
    run_dir, rows, _log, sites = federation
    refusing, others = sites[0].name, sorted(p.name for p in sites[1:])
    trained = {(r["round"], r["site"]) for r in rows if r["phase"] == "train" and r["experiment"] == "global"}
    assert trained == {(n, site) for n in (1, 2) for site in others}
    assert (run_dir / "final_model.pt").is_file()
    # scoring is not training: the refusing site still scores the global model every round
    evaluated = {r["site"] for r in rows if r["phase"] == "evaluate" and r["round"] == 2}
    assert evaluated == {refusing, *others}


def test_metrics_jsonl_has_the_refusal_with_category_and_reason(federation):
    run_dir, rows, _log, sites = federation
    refused = [r for r in rows if r["phase"] == REFUSED]
    assert {(r["experiment"], r["round"], r["request"]) for r in refused} == {
        ("global", 1, "train"), ("global", 2, "train"), (f"local:{sites[0].name}", 2, "train.local")}
    for row in refused:
        assert row["site"] == sites[0].name and row["category"] == POLICY
        assert "batch-size 4" in row["reason"] and "minimum of 8" in row["reason"]
        assert str(sites[0]) not in json.dumps(row) and "/" not in row["reason"]  # the reply carried no path


def test_the_coordinator_logs_the_refusal(federation):
    _run_dir, _rows, messages, sites = federation
    logged = [m for m in messages if "refused" in m]
    assert len(logged) == 3
    assert all(sites[0].name in m and POLICY in m and "batch-size 4" in m for m in logged)


def test_summary_and_report_show_the_refusal(federation):
    run_dir, rows, _log, sites = federation
    expected = [{k: v for k, v in r.items() if k not in ("phase", "time")} for r in rows if r["phase"] == REFUSED]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["refusals"] == [r for r in expected if r["experiment"] == "global"]  # written after training
    report = json.loads((run_dir / "report.json").read_text())
    assert report["refusals"] == expected
    page = (run_dir / "report.html").read_text()
    assert 'href="#refusals"' in page
    section = page.split('<section id="refusals">')[1].split("</section>")[0]
    assert section.count(f"<td>{sites[0].name}</td>") == len(expected)
    assert section.count("batch-size 4 is below this site&#x27;s minimum of 8") == len(expected)
    # the local-only model of the refusing site does not exist; the other two were scored everywhere
    assert set(report["models"]) >= {f"local:{p.name}" for p in sites[1:]}
    assert f"local:{sites[0].name}" not in report["models"]
