"""Cross-site evaluation in a real federation on Flower's simulation engine: every model at every site.

One leave-one-out run of three phantom sites with both baselines, where the second site keeps its local-only model
and its images at home (``share_local_model`` and ``share_previews`` false), and one ``holdout-site`` run. The
numbers in ``cross_site.json`` / ``report.json`` are checked against a direct evaluation of the saved models on the
same test scans, and the coordinator's message log against what each site may receive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.simulation import run_simulation

from client.app import build_client_app
from client.evaluation import score_scan
from client.paired import paired_for
from client.pairs import prepare_site
from server.app import build_server_app
from server.settings import RunSettings
from shared_models.checkpoint import load_checkpoint
from simulation.phantoms import write_phantom_sites

TINY = dict(num_rounds=2, local_steps=6, batch_size=4, patch_size=32, eval_max_slices=6, min_sites=1)


def simulate(sites: list[Path], run_dir: Path, **settings) -> Path:
    """One run of ``sites`` in-process on Flower's simulation engine; returns the run folder."""
    run = RunSettings(num_sites=len(sites), run_dir=str(run_dir), sites_dir=str(sites[0].parent),
                      **{**TINY, **settings})
    run_simulation(
        server_app=build_server_app(run),
        client_app=build_client_app([str(site) for site in sites]),
        num_supernodes=len(sites),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    return run_dir


def keep_at_home(site: Path) -> None:
    """This site's site.toml: its local-only model and its images stay at the site."""
    text = (site / "site.toml").read_text()
    text = text.replace("share_local_model = true", "share_local_model = false")
    (site / "site.toml").write_text(text.replace("share_previews = true", "share_previews = false"))


@pytest.fixture(scope="module")
def phantom_sites(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("cross-site")
    sites = write_phantom_sites(root / "sites", n_sites=3, subjects_per_site=5, shape=(48, 48, 16), seed=5)
    keep_at_home(sites[1])
    return sites


@pytest.fixture(scope="module")
def loo(phantom_sites, tmp_path_factory) -> tuple[Path, dict, dict, list[str]]:
    run_dir = simulate(phantom_sites, tmp_path_factory.mktemp("loo") / "run", baselines="local,pooled",
                       leave_one_out=True)
    cross = json.loads((run_dir / "cross_site.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    return run_dir, cross, report, [site.name for site in phantom_sites]


def messages(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "messages.jsonl").read_text().splitlines()]


def test_every_model_is_scored_at_every_site_that_may_see_it(loo):
    _run_dir, cross, _report, names = loo
    home = names[1]
    expected = {"global", "pooled", "interpolation", *(f"local:{n}" for n in names), *(f"holdout:{n}" for n in names)}
    assert set(cross["scores"]) == expected
    for model, cells in cross["scores"].items():
        assert set(cells) == ({home} if model == f"local:{home}" else set(names)), model
    assert cross["models"][f"local:{home}"]["shared"] is False
    assert any(f"local:{home}" in note and "only" in note for note in cross["notes"])


def test_a_held_out_site_gets_no_training_message_while_it_is_held_out(loo):
    run_dir, _cross, _report, names = loo
    sent = messages(run_dir)
    for name in names:
        part = [m for m in sent if m["part"] == f"holdout:{name}"]
        assert part, f"no message of the federation without {name}"
        assert {m["site"] for m in part} == set(names) - {name}
    # every site is scored once, after training, and the test split is touched by nothing else
    cross = [m for m in sent if m["type"] == "evaluate.cross"]
    assert sorted(m["site"] for m in cross) == sorted(names)
    assert max(m["time"] for m in sent if m["type"].startswith("train")) <= min(m["time"] for m in cross)


def test_matrix_values_equal_a_direct_evaluation_of_the_saved_models(loo, phantom_sites):
    run_dir, cross, report, names = loo
    settings = RunSettings(**TINY)
    pairing = paired_for(settings.spatial_dims)
    files = {"global": run_dir / "final_model.pt", "pooled": run_dir / "models" / "pooled.pt",
             f"local:{names[0]}": run_dir / "models" / f"local-{names[0]}.pt"}
    for model_name, path in files.items():
        model, _meta = load_checkpoint(path)
        for site_dir in phantom_sites:
            site = prepare_site(str(site_dir), settings.scale, pairing)
            direct = [
                score_scan(pairing.restore(model, pair, device=torch.device("cpu")), pair, pairing, site.profile,
                           max_slices=settings.eval_max_slices)
                for pair in site.test
            ]
            stored = cross["scores"][model_name][site.name]
            for metric in ("psnr", "ssim", "nrmse", "hfen", "dc-error", "hf-excess"):
                np.testing.assert_allclose(stored[metric], [row[metric] for row in direct], rtol=1e-5, atol=1e-6)
            cell = report["cross_site"]["psnr"][model_name][site.name]
            assert cell["mean"] == pytest.approx(np.mean(stored["psnr"]))
            assert cell["n_scans"] == len(site.test)


def test_no_image_leaves_a_site_that_does_not_consent(loo):
    run_dir, _cross, report, names = loo
    assert not (run_dir / "previews" / f"{names[1]}.npz").exists()
    assert names[1] not in report["previews"]
    with np.load(run_dir / "previews" / f"{names[0]}.npz") as crops:
        assert {"lr", "interpolation", "hr", "sr:global"} <= set(crops.files)
        assert f"sr:local:{names[1]}" not in crops.files


def test_the_report_tabulates_each_unseen_scanner_beside_its_in_federation_score(loo):
    run_dir, _cross, report, names = loo
    assert set(report["leave_one_out"]) == set(names)
    for name, entry in report["leave_one_out"].items():
        assert entry["held_out"]["psnr"]["mean"] == report["cross_site"]["psnr"][f"holdout:{name}"][name]["mean"]
        assert entry["in_federation"]["psnr"]["mean"] == report["cross_site"]["psnr"]["global"][name]["mean"]
    assert (run_dir / "report.html").stat().st_size > 10_000


def test_holdout_site_trains_without_it_and_scores_it_as_unseen(phantom_sites, tmp_path):
    held_out = phantom_sites[2].name
    run_dir = simulate(phantom_sites, tmp_path / "run", baselines="local", holdout_site=held_out, num_rounds=1)
    sent = messages(run_dir)
    (node,) = {m["node"] for m in sent if m["site"] == held_out}  # describe goes out before names are known
    assert {m["type"] for m in sent if m["node"] == node} == {"query.describe", "evaluate.cross"}
    cross = json.loads((run_dir / "cross_site.json").read_text())
    assert cross["models"][f"holdout:{held_out}"]["trained_on"] == sorted(p.name for p in phantom_sites[:2])
    assert held_out in cross["scores"][f"holdout:{held_out}"]
    assert cross["sites"][held_out]["in_federation"] is False
    summary = json.loads((run_dir / "summary.json").read_text())
    assert held_out not in summary["sites"]
