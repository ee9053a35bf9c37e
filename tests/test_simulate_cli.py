"""``fedsr simulate`` end to end, as a user runs it: files, numbers, quiet terminal, clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from shared_models.checkpoint import load_checkpoint

TINY = ["--sites", "2", "--rounds", "2", "--local-steps", "25", "--batch-size", "8", "--patch-size", "32"]


def fedsr(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "simulation.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = fedsr("simulate", "--run-dir", str(run_dir), *TINY)
    out, _ = proc.communicate(timeout=600)
    return run_dir, proc.returncode, out


def test_simulate_writes_every_promised_file(tiny_run):
    run_dir, code, out = tiny_run
    assert code == 0, out
    for name in ("config.toml", "metrics.jsonl", "final_model.pt", "summary.json", "flower.log", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["num-rounds"] == 2 and config["local-steps"] == 25 and config["num-sites"] == 2
    model, meta = load_checkpoint(run_dir / "final_model.pt")
    assert meta["model"]["name"] == "edsr" and meta["scale"] == 2


def test_summary_has_every_site_metric(tiny_run):
    run_dir, _code, _out = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["wall_seconds"] > 0
    assert len(summary["sites"]) == 2
    for metrics in summary["sites"].values():
        for key in ("psnr", "ssim", "nrmse", "hfen", "bicubic_psnr", "bicubic_ssim", "num_val_scans"):
            assert key in metrics
        assert metrics["num_val_scans"] >= 1


def test_training_improves_psnr_over_round_zero_at_every_site(tiny_run):
    run_dir, _code, _out = tiny_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {(r["round"], r["site"]): r["psnr"] for r in rows if r["phase"] == "evaluate"}
    sites = {site for _, site in evals}
    assert len(sites) == 2
    for site in sites:
        assert evals[(2, site)] > evals[(0, site)] + 0.1, (site, evals)


def test_flower_and_ray_logs_stay_off_the_terminal(tiny_run):
    run_dir, _code, out = tiny_run
    assert "round   2" in out and "Final global model" in out
    assert "configure_train" not in out and "ClientAppActor" not in out
    assert "configure_train" in (run_dir / "flower.log").read_text()


def test_ctrl_c_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = fedsr("simulate", "--run-dir", str(run_dir), *TINY[:2], "--rounds", "50", "--local-steps", "5",
                 "--batch-size", "4", "--patch-size", "32", start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, out
    assert "stopped" in out and "checkpoint.pt" in out
    model, meta = load_checkpoint(run_dir / "checkpoint.pt")
    assert 1 <= meta["extra"]["round"] < 50
    assert not list(run_dir.glob(".*.tmp"))  # no half-written checkpoint left behind
    assert not (run_dir / "summary.json").exists()


def test_bad_flags_are_refused_before_anything_starts(tmp_path):
    proc = fedsr("simulate", "--run-dir", str(tmp_path / "r"), "--scale", "3", "--sites", "2")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "scale must be 2 or 4" in out


def test_a_missing_sites_folder_is_a_clear_error(tmp_path):
    proc = fedsr("simulate", "--run-dir", str(tmp_path / "r"), "--sites-dir", str(tmp_path / "nowhere"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "does not exist" in out


def test_models_lists_every_family_with_its_parameter_count():
    proc = fedsr("models")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    for family in ("srcnn", "edsr", "swinir", "gan", "smore"):
        assert family in out
    assert "1,367,553" in out  # EDSR base, 1 channel, x2


def test_sites_check_lists_scans_and_every_unusable_file(tmp_path):
    from simulation.phantoms import write_phantom_sites

    (site,) = write_phantom_sites(tmp_path, n_sites=1, subjects_per_site=3, shape=(32, 32, 16))
    (site / "scan.dcm").write_bytes(b"\x00" * 200)
    proc = fedsr("sites", "check", str(site))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "sub-001" in out and "train" in out and "scan.dcm" in out and "skipped" in out
    proc = fedsr("sites", "check", str(tmp_path / "missing"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "does not exist" in out
