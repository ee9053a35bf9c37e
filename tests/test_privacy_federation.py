"""DP-SGD in whole federations (``fedsr simulate --dp local`` on Flower's simulation engine): each site's ledger
persists and accumulates across two runs on the same site folders; in the second run a site whose budget the
round would pass refuses it, the federation completes on the others, and the refusal is in metrics.jsonl and the
report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.privacy_ledger import LEDGER_NAME, PrivacyLedger
from client.state import DEFAULT_STATE_DIR_NAME
from simulation.phantoms import write_phantom_sites

pytestmark = pytest.mark.slow

DP_RUN = ["--rounds", "2", "--local-steps", "4", "--batch-size", "8", "--patch-size", "32", "--baselines", "none",
          "--dp", "local", "--dp-target-epsilon", "4", "--min-sites", "2", "--run-config", "eval-max-slices=4"]


def simulate(sites: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared_models.cli", "simulate", "--sites-dir", str(sites),
                           "--run-dir", str(run_dir), *DP_RUN], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, COLUMNS="200"))


def ledger(site: Path) -> PrivacyLedger:
    return PrivacyLedger.open(site / DEFAULT_STATE_DIR_NAME)


@dataclass
class TwoRuns:
    sites: list[Path]
    first: Path
    second: Path
    after_first: dict[str, float]
    budget: float


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> TwoRuns:
    """Two DP runs on the same three site folders; between them site 3 gets a budget that lets it finish the first
    run's spending but not one more round."""
    root = tmp_path_factory.mktemp("dp-federation")
    sites = write_phantom_sites(root / "sites", n_sites=3, subjects_per_site=5, shape=(48, 48, 16))
    done = simulate(root / "sites", root / "first")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after_first = {site.name: ledger(site).epsilon("patient", 1e-5) for site in sites}
    budget = after_first[sites[2].name] + 0.05  # not enough for one more round
    toml = sites[2] / "site.toml"
    toml.write_text(toml.read_text() + f"\n[privacy]\nepsilon_budget = {budget}\n")
    done = simulate(root / "sites", root / "second")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return TwoRuns(sites, root / "first", root / "second", after_first, budget)


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_ledger_accumulates_across_runs_and_every_train_row_reports_its_epsilon(two_runs):
    for site in two_runs.sites[:2]:
        spends = ledger(site).spends()
        assert [s.round for s in spends] == [1, 2, 1, 2]  # two runs of two rounds each
        assert len({s.run for s in spends}) == 2 and all(s.unit == "patient" for s in spends)
        assert [s.epsilon for s in spends] == sorted(s.epsilon for s in spends)  # it only grows
        assert 3.8 <= two_runs.after_first[site.name] <= 4.0  # the first run spent its planned target
        assert spends[-1].epsilon > two_runs.after_first[site.name] + 1  # the second added to it, not restarted
        trained = [r for r in metric_rows(two_runs.second) if r["phase"] == "train" and r["site"] == site.name]
        assert [r["dp-epsilon"] for r in trained] == pytest.approx([s.epsilon for s in spends[2:]])
    assert not list(two_runs.sites[0].joinpath(DEFAULT_STATE_DIR_NAME).glob(".*.tmp"))
    assert (two_runs.sites[0] / DEFAULT_STATE_DIR_NAME / LEDGER_NAME).is_file()


def test_a_site_at_its_budget_refuses_and_the_federation_finishes_without_it(two_runs):
    refusing = two_runs.sites[2]
    assert len(ledger(refusing).spends()) == 2  # nothing spent in the second run: it refused before training
    assert ledger(refusing).epsilon("patient", 1e-5) <= two_runs.budget
    rows = metric_rows(two_runs.second)
    refused = [r for r in rows if r["site"] == refusing.name and r.get("category") == "privacy-budget"]
    assert refused and all("budget" in r["reason"] and str(refusing) not in r["reason"] for r in refused)
    trained = {(r["round"], r["site"]) for r in rows if r["phase"] == "train"}
    assert trained == {(n, s.name) for n in (1, 2) for s in two_runs.sites[:2]}
    assert (two_runs.second / "final_model.pt").is_file()
    report = json.loads((two_runs.second / "report.json").read_text())
    assert [r["category"] for r in report["refusals"]] and {r["category"] for r in report["refusals"]} == {
        "privacy-budget"}
    privacy = report["privacy"]
    assert (privacy["dp"], privacy["unit"], privacy["warning"]) == ("local", "patient", None)
    assert set(privacy["sites"]) == {s.name for s in two_runs.sites[:2]}  # the refusing site trained nothing
    for site in two_runs.sites[:2]:
        assert privacy["sites"][site.name]["epsilon"] == pytest.approx(ledger(site).spends()[-1].epsilon)
    membership = privacy["membership"]  # every site checked the global model, the refusing one too
    assert set(membership) == {s.name for s in two_runs.sites}
    assert all(0.0 <= m["mia-auc"] <= 1.0 and m["mia-members"] > 0 < m["mia-non-members"] for m in membership.values())
    page = (two_runs.second / "report.html").read_text()
    assert 'id="privacy"' in page and 'id="refusals"' in page and "privacy-budget" in page
