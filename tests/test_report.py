"""The cross-site report's data (server/report.py) and ``fedsr report RUN_DIR`` (server/cli.py).

Every expectation is recomputed here from the stored per-scan lists of a synthetic run folder
(tests/report_samples.py), never copied from the report itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from report_samples import sample_site_names, write_sample_run
from server.report import METRICS, ReportInputError, build_report, cell
from shared_models.cli import app

SCORED = ("psnr", "ssim", "nrmse", "hfen", "dc-error", "hf-excess")


def stored_scores(run_dir: Path) -> dict:
    return json.loads((run_dir / "cross_site.json").read_text())["scores"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """A 3-site holdout run whose second site keeps its local model and whose third has 2 test scans."""
    run_dir = write_sample_run(tmp_path_factory.mktemp("run"), unshared_site=1, short_site=2)
    return run_dir, build_report(run_dir)


def test_matrix_cells_are_the_means_of_the_stored_per_scan_lists(run):
    run_dir, report = run
    scores = stored_scores(run_dir)
    for metric in SCORED:
        stored_cells = {(m, s) for m, by_site in scores.items() for s in by_site}
        assert {(m, s) for m, by_site in report["cross_site"][metric].items() for s in by_site} == stored_cells
        for model, by_site in scores.items():
            for site, values in by_site.items():
                got = report["cross_site"][metric][model][site]
                assert got["mean"] == pytest.approx(np.mean(values[metric]))
                assert got["n_scans"] == len(values[metric])
    unshared = f"local:{sample_site_names(3)[1]}"
    assert list(report["cross_site"]["psnr"][unshared]) == [sample_site_names(3)[1]]  # scored at its own site only
    assert list(report["metrics"]) == list(METRICS) and all(
        {"label", "unit", "higher_is_better"} <= entry.keys() for entry in report["metrics"].values())


def test_intervals_contain_the_mean_match_a_plain_percentile_bootstrap_and_shrink_with_more_scans(tmp_path):
    widths = {}
    for scans in (4, 40):
        report = build_report(write_sample_run(tmp_path / str(scans), scans_per_site=scans, holdout=False))
        cells = [c for by_site in report["cross_site"]["psnr"].values() for c in by_site.values()]
        assert all(c["ci95"][0] <= c["mean"] <= c["ci95"][1] and c["note"] is None for c in cells)
        widths[scans] = np.mean([c["ci95"][1] - c["ci95"][0] for c in cells])
    assert widths[40] < widths[4] / 2  # ~ 1/sqrt(n)

    values = np.random.default_rng(7).normal(30.0, 1.5, 12)
    means = np.random.default_rng(1).choice(values, (20_000, values.size)).mean(axis=1)  # an independent bootstrap
    expected = np.percentile(means, [2.5, 97.5])
    interval = cell(values.tolist())["ci95"]
    assert interval == pytest.approx(expected, abs=0.05 * (expected[1] - expected[0]))
    assert cell(values.tolist()) == cell(values.tolist())  # fixed seed: the same report twice


def test_equal_values_give_a_point_interval_and_fewer_than_3_scans_none(run):
    assert cell([0.25] * 5) == {"mean": 0.25, "ci95": [0.25, 0.25], "n_scans": 5, "note": None}
    _run_dir, report = run
    short = sample_site_names(3)[2]
    for metric in METRICS:
        for by_site in report["cross_site"][metric].values():
            if short in by_site:
                assert by_site[short]["ci95"] is None and by_site[short]["n_scans"] == 2
                assert by_site[short]["note"] == "fewer than 3 test scans (n=2): no interval"
    assert any(short in note and "no intervals" in note for note in report["notes"])


def test_gains_are_the_paired_per_scan_differences_with_the_sites_interpolation(run):
    run_dir, report = run
    scores = stored_scores(run_dir)
    assert "interpolation" not in report["cross_site"]["psnr-gain"]
    for model, by_site in scores.items():
        if model == "interpolation":
            continue
        for site, values in by_site.items():
            for gain, metric in (("psnr-gain", "psnr"), ("ssim-gain", "ssim")):
                paired = np.subtract(values[metric], scores["interpolation"][site][metric])
                assert report["cross_site"][gain][model][site] == cell(paired.tolist())
    # Pairing matters: the paired interval is narrower than that of unpaired differences of the same scans.
    site = sample_site_names(3)[0]
    shuffled = np.subtract(scores["global"][site]["psnr"], scores["interpolation"][site]["psnr"][::-1])
    paired_cell = report["cross_site"]["psnr-gain"]["global"][site]
    assert np.ptp(paired_cell["ci95"]) < np.ptp(cell(shuffled.tolist())["ci95"])


def test_pooled_test_is_over_the_concatenated_scans_of_models_scored_everywhere(run):
    run_dir, report = run
    scores = stored_scores(run_dir)
    sites = sample_site_names(3)
    everywhere = [m for m, by_site in scores.items() if set(by_site) == set(sites)]
    assert set(report["pooled_test"]["psnr"]) == set(everywhere)
    assert f"local:{sites[1]}" not in report["pooled_test"]["psnr"]
    for model in everywhere:
        for metric in SCORED:
            joined = [v for site in sites for v in scores[model][site][metric]]
            got = report["pooled_test"][metric][model]
            assert got["mean"] == pytest.approx(np.mean(joined)) and got["n_scans"] == len(joined) == 4 + 4 + 2
    joined_gain = [a - b for site in sites
                   for a, b in zip(scores["pooled"][site]["psnr"], scores["interpolation"][site]["psnr"])]
    assert report["pooled_test"]["psnr-gain"]["pooled"]["mean"] == pytest.approx(np.mean(joined_gain))


def test_leave_one_out_picks_the_holdout_the_global_and_the_other_local_cells(run, tmp_path):
    _run_dir, report = run
    sites = sample_site_names(3)
    matrix = report["cross_site"]
    assert list(report["leave_one_out"]) == sites
    for site, entry in report["leave_one_out"].items():
        for metric in METRICS:
            assert entry["held_out"][metric] == matrix[metric][f"holdout:{site}"][site]
            assert entry["in_federation"][metric] == matrix[metric]["global"][site]
        # The unshared site's local model was scored only there: it is nobody else's "local elsewhere".
        others = {f"local:{t}" for t in sites if t != site and (t != sites[1])}
        assert set(entry["local_elsewhere"]) == others
        for model, cells in entry["local_elsewhere"].items():
            assert cells == {metric: matrix[metric][model][site] for metric in METRICS}
    assert build_report(write_sample_run(tmp_path, holdout=False))["leave_one_out"] == {}


def test_rounds_training_previews_and_notes(run):
    run_dir, report = run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(report["rounds"]) == sum(r["phase"] == "evaluate" for r in rows)
    assert len(report["training"]) == sum(r["phase"] == "train" for r in rows)
    experiments = {"global", *(f"holdout:{site}" for site in sample_site_names(3))}
    assert {r["experiment"] for r in report["rounds"]} == experiments
    assert all("phase" not in r and "train-loss" in r for r in report["training"])
    first = report["rounds"][0]
    assert first["experiment"] == "global" and first["round"] == 0 and "baseline-psnr" in first
    for site, entry in report["previews"].items():
        with np.load(run_dir / entry["file"]) as arrays:
            assert entry["models"] == [name.removeprefix("sr:") for name in arrays.files if name.startswith("sr:")]
    assert list(report["previews"]) == sample_site_names(3)
    assert report["notes"][0] == json.loads((run_dir / "cross_site.json").read_text())["notes"][0]
    assert all(entry["test_note"] is None for entry in report["sites"].values())
    assert report["config"]["num-rounds"] == 3 and report["schema"] == "fedsr-report/1"


def test_a_run_stopped_before_cross_site_evaluation_still_has_its_rounds(tmp_path):
    run_dir = write_sample_run(tmp_path, holdout=False, previews=False)
    (run_dir / "cross_site.json").unlink()
    report = build_report(run_dir)
    assert report["rounds"] and report["training"]
    assert all(by_model == {} for by_model in report["cross_site"].values())
    assert report["sites"] == {} and report["previews"] == {} and report["leave_one_out"] == {}
    assert any("cross-site evaluation did not run" in note for note in report["notes"])


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "cross_site.json").write_text((d / "cross_site.json").read_text()[:500]), "cross_site.json"),
    (lambda d: _append(d / "metrics.jsonl", '{"round": 4, "pha'), "line 22 "),  # 3 sites x (1 + 3 x 2) rows, then it
    (lambda d: (d / "config.toml").write_text("model = "), "config.toml"),
    (lambda d: _edit_cross_site(d, lambda c: c["scores"]["global"]["site-1-siemens-prisma-3t"]["psnr"].pop()),
     "must pair up"),
])
def test_a_damaged_file_is_named_with_what_to_do(tmp_path, damage, named):
    run_dir = write_sample_run(tmp_path, holdout=False, previews=False)
    damage(run_dir)
    with pytest.raises(ReportInputError, match=named) as raised:
        build_report(run_dir)
    assert str(run_dir) in str(raised.value) and raised.value.hint


def _append(path: Path, text: str) -> None:
    with path.open("a") as handle:
        handle.write(text)


def _edit_cross_site(run_dir: Path, change) -> None:
    stored = json.loads((run_dir / "cross_site.json").read_text())
    change(stored)
    (run_dir / "cross_site.json").write_text(json.dumps(stored))


def test_fedsr_report_writes_the_report_through_the_real_command(tmp_path):
    run_dir = write_sample_run(tmp_path / "run", unshared_site=0)
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    written = json.loads((run_dir / "report.json").read_text())
    assert written["schema"] == "fedsr-report/1" and written["cross_site"] == build_report(run_dir)["cross_site"]
    assert str(run_dir / "report.json") in result.output
    assert (run_dir / "report.html").is_file() and str(run_dir / "report.html") in result.output


def test_fedsr_report_on_a_folder_that_is_not_a_run_exits_2_and_names_it(tmp_path):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 2
    assert str(folder) in result.output and "not a run folder" in result.output
    assert not (folder / "report.json").exists()
