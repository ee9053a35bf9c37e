"""Personalisation (``personal = "head"``): each site keeps its own reconstruction head, which never leaves it.

One small federation on Flower's simulation engine, personalised and scanner-aware together (``condition =
"acquisition"``), with every reply audited; then, on the sites it left behind, the head file read back by a later
run, evaluation with the site's own head, and a site without a head fitting one on its training split alone.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from client.acquisition import site_acquisition
from client.evaluation import evaluate_pairs
from client.personal import head_path, head_state, scoring_head
from client.state import load_state, save_state_atomic, site_state_dir
from client.tasks import RoundJob, task_for
from message_audit import audit, run_recorded, travelling_arrays
from server.settings import RunSettings
from shared_models.checkpoint import load_checkpoint
from shared_models.conditioning import FILM_NAME, set_acquisition
from shared_models.personal import personalisation_summary
from shared_models.registry import build_from_settings, family, personal_keys
from simulation.phantoms import write_phantom_sites

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("personal")
    sites = write_phantom_sites(root / "sites", n_sites=2, subjects_per_site=4, shape=(48, 48, 16), seed=3)
    settings = RunSettings(model="srcnn", num_rounds=1, num_sites=2, min_sites=1, local_steps=3, batch_size=4,
                           patch_size=32, eval_max_slices=4, baselines="local", evaluate_round_zero=False,
                           personal="head", condition="acquisition", run_dir=str(root / "run"),
                           sites_dir=str(root / "sites"))
    replies = run_recorded(settings, sites)
    return {"settings": settings, "sites": sites, "replies": replies, "run": root / "run"}


def _job(settings: RunSettings, server_round: int, **changes) -> RoundJob:
    config = {**settings.round_config(), "server-round": server_round}
    return dataclasses.replace(RoundJob.from_config(config, torch.device("cpu")), **changes)


def _global_body(federation: dict) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(federation["run"] / "final_model.pt")
    return {k: v.clone() for k, v in family("srcnn").shared_state(model, None).items()}


def test_no_personal_weight_is_ever_sent(federation) -> None:
    settings, replies = federation["settings"], federation["replies"]
    head = personal_keys(build_from_settings(settings))
    travelling = travelling_arrays(settings)
    assert head and not head & set(travelling)
    assert any(FILM_NAME in key for key in travelling)  # the conditioning travels
    sent = {key for reply in replies if not reply.has_error()
            for name, record in reply.content.array_records.items() if name != "previews" for key in record}
    assert sent == set(travelling)
    kinds = {reply.metadata.message_type for reply in replies if not reply.has_error()}
    assert {"train", "evaluate", "train.local", "evaluate.cross"} <= kinds
    assert audit(replies, travelling, forbidden=[str(site) for site in federation["sites"]]) == []


def test_the_run_scores_every_site_and_saves_the_options_with_the_model(federation) -> None:
    cross = json.loads((federation["run"] / "cross_site.json").read_text())
    assert json.dumps(cross).count("psnr") > 0
    model, meta = load_checkpoint(federation["run"] / "final_model.pt")
    assert meta["model"]["params"]["personal"] == "head" and meta["model"]["params"]["condition"] == "acquisition"
    summary = personalisation_summary(model, federation["settings"])
    assert summary["weights"] == sorted(personal_keys(model))
    state = model.state_dict()
    assert summary["personal_parameters"] == sum(state[key].numel() for key in personal_keys(model))
    assert summary["personal_parameters"] + summary["shared_parameters"] == sum(v.numel() for v in state.values())
    assert str(federation["settings"].local_steps) in summary["new_site"]
    assert personalisation_summary(build_from_settings(RunSettings(model="srcnn")), federation["settings"]) is None
    options = json.loads((federation["run"] / "report.json").read_text())["model_options"]
    assert options["personal"]["weights"] == summary["weights"]
    assert options["conditioning"]["feature_maps"] and options["conditioning"]["film_parameters"] > 0
    page = (federation["run"] / "report.html").read_text()
    assert 'id="model-options"' in page and "Personal head" in page and "Conditioned on the acquisition" in page


def test_each_site_keeps_its_heads_and_a_later_run_reads_them_back(federation) -> None:
    settings = federation["settings"]
    for site_dir in federation["sites"]:
        state_dir = site_state_dir({}, site_dir)
        model = build_from_settings(settings)
        federated, local = head_path(model, state_dir), head_path(model, state_dir / "local-baseline")
        assert federated.is_file() and local.is_file()
        assert not [p for p in state_dir.rglob("*.tmp")]
        saved = load_state(federated)
        assert saved["round"] == 1 and set(saved["head"]) == personal_keys(model)
        assert any(not torch.equal(value, head_state(model)[key]) for key, value in saved["head"].items())

        # a later run going on at round 2: a freshly built model gets the head from disk ...
        task, job = task_for("srcnn"), _job(settings, 2)
        site = task.prepare(str(site_dir), job)
        task.load_global(model, _global_body(federation), site, job)
        for key, value in saved["head"].items():
            torch.testing.assert_close(head_state(model)[key], value, rtol=0, atol=0)
        # ... while a new run's round 1 (the file is from round 1: another run) starts from the head as built
        fresh = build_from_settings(settings)
        built = head_state(fresh)
        task.load_global(fresh, _global_body(federation), site, _job(settings, 1))
        assert all(torch.equal(head_state(fresh)[key], value) for key, value in built.items())


def test_evaluation_uses_the_sites_own_head(federation, tmp_path: Path) -> None:
    settings, site_dir = federation["settings"], federation["sites"][0]
    task, job = task_for("srcnn"), _job(settings, 1, node_config={"state-dir": str(tmp_path)})
    site = task.prepare(str(site_dir), job)
    body = _global_body(federation)
    model = build_from_settings(settings)
    path = head_path(model, tmp_path)
    shutil.copy(head_path(model, site_state_dir({}, site_dir)), path)  # the site's head, in a state folder of its own
    scores = task.evaluate(model, body, site, job)

    by_hand = build_from_settings(settings)
    by_hand.load_state_dict({**by_hand.state_dict(), **body, **load_state(path)["head"]})
    set_acquisition(by_hand, site_acquisition(site))
    direct = evaluate_pairs(by_hand, site.val, site.pairing, device=job.torch_device, max_slices=job.eval_max_slices)
    assert scores["psnr"] == direct["psnr"]

    saved = load_state(path)
    save_state_atomic(path, {**saved, "head": {k: v * 0.5 for k, v in saved["head"].items()}})
    assert task.evaluate(build_from_settings(settings), body, site, job)["psnr"] != scores["psnr"]


def test_a_site_without_a_head_fits_one_on_its_training_split_with_the_body_frozen(federation, tmp_path) -> None:
    settings, site_dir = federation["settings"], federation["sites"][1]
    task = task_for("srcnn")
    body = _global_body(federation)
    heads = []
    for folder, keep_splits in ((tmp_path / "a", True), (tmp_path / "b", False)):
        job = _job(settings, 1, node_config={"state-dir": str(folder)})  # a new site: nothing in its state folder
        site = task.prepare(str(site_dir), job)
        if not keep_splits:  # the same site without validation and test scans: the fit must not change
            site = dataclasses.replace(site, val=(), test=())
        model = build_from_settings(settings)
        built = head_state(model)
        task.load_global(model, body, site, job)
        scoring_head(model, body, site, job)
        state = model.state_dict()
        assert all(torch.equal(state[key], value) for key, value in body.items())  # the body stayed frozen
        assert any(not torch.equal(state[key], value) for key, value in built.items())  # the head was fitted
        assert not list(folder.rglob("personal-head-*"))  # scoring saves nothing
        heads.append(head_state(model))
    for key, value in heads[0].items():
        torch.testing.assert_close(heads[1][key], value, rtol=0, atol=0)
