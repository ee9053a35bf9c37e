"""Central (client-level) DP: Flower's DP strategy wrappers around the federation (server/central_dp.py), the
sites' clipping mod (client/central_dp.py), and the client-level epsilon in summary.json and the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from server.central_dp import CENTRAL_DELTA, central_noise_multiplier, client_level_epsilon
from server.settings import RunSettings


def gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` unsampled Gaussian mechanisms: RDP alpha / (2 sigma^2) per round (Mironov 2017),
    converted with Balle et al. 2020, Theorem 21, minimised over a fine grid of orders; written from the papers."""
    orders = [1 + x / 100 for x in range(1, 20_000)]
    return min(rounds * a / (2 * sigma ** 2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
               for a in orders)


def test_client_level_epsilon_equals_the_closed_form_of_the_gaussian_mechanism():
    for sigma, rounds in [(0.5, 2), (1.0, 5), (2.5, 40)]:
        assert client_level_epsilon(sigma, rounds) == pytest.approx(gaussian_epsilon(sigma, rounds, CENTRAL_DELTA),
                                                                    rel=0.02)


def test_the_noise_is_planned_for_all_rounds_from_the_target():
    settings = RunSettings(dp="central", dp_target_epsilon=6.0, num_rounds=10)
    sigma = central_noise_multiplier(settings)
    assert 5.9 <= client_level_epsilon(sigma, 10) <= 6.0
    assert central_noise_multiplier(settings.replace(dp_noise_multiplier=1.3)) == 1.3


@pytest.mark.slow
def test_a_central_dp_run_with_client_side_adaptive_clipping_completes_and_reports_epsilon(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "shared_models.cli", "simulate", "--run-dir", str(run_dir), "--rounds", "2",
         "--local-steps", "4", "--batch-size", "8", "--patch-size", "32", "--baselines", "none", "--dp", "central",
         "--dp-clipping", "client-adaptive", "--dp-noise-multiplier", "0.8", "--run-config", "eval-max-slices=4"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="200"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    central = json.loads((run_dir / "summary.json").read_text())["central_dp"]
    assert central["unit"] == "site" and central["clipping"] == "client-adaptive"
    assert central["epsilon"] == pytest.approx(gaussian_epsilon(0.8, 2, CENTRAL_DELTA), rel=0.02)
    log = (run_dir / "flower.log").read_text()
    assert log.count("adaptiveclipping_mod: ndarrays are clipped") == 3 * 2  # every site, every round, at the site
    report = json.loads((run_dir / "report.json").read_text())
    assert report["privacy"]["central"] == central and report["privacy"]["unit"] == "site"
    assert 'id="privacy"' in (run_dir / "report.html").read_text()
