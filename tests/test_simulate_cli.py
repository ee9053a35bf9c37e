"""``fedsr simulate`` as a user runs it: options derived from the declared run settings, ``--run-config``, tables
that fit an 80-column terminal, and (slow) a whole federation end to end: files, numbers, quiet terminal, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from unittest import mock

import pytest
import typer.rich_utils
from rich.console import Console
from typer.testing import CliRunner

import simulation.cli as simulate_cli
from server.settings import RunSettings
from shared_models.checkpoint import load_checkpoint
from shared_models.cli import app as root_app
from simulation.cli import FLAGS, settings_from_command_line
from simulation.phantoms import site_look
from simulation.progress import follower_rows, round_line, round_table, summary_table

TINY = ["--sites", "2", "--rounds", "2", "--local-steps", "25", "--batch-size", "8", "--patch-size", "32"]
METRICS = ("psnr", "ssim", "nrmse", "hfen")


def fedsr(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "shared_models.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


def invoke(*args: str):
    """``fedsr ARGS`` in this process, on a wide terminal (help lines unwrapped). Typer reads TERMINAL_WIDTH once,
    when it is first imported (in a test worker that may be before this test), so its width is set here too."""
    with mock.patch.object(typer.rich_utils, "MAX_WIDTH", 400):
        return CliRunner().invoke(root_app, list(args), env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})


# --------------------------------------------------------------------------- options from the declarations
def test_every_declared_flag_is_a_simulate_option_with_its_help_and_default():
    result = invoke("simulate", "--help")
    assert result.exit_code == 0, result.output
    assert FLAGS, "no setting declares a flag"
    for declared in FLAGS:
        assert declared.flag in result.output, declared.flag
        assert declared.help in result.output, declared.help
        if declared.kind is bool:  # typer shows a switch's default by its name
            switch = declared.flag if declared.default else f"--no-{declared.flag.removeprefix('--')}"
            assert f"[default: {switch.removeprefix('--')}]" in result.output, declared.key
        elif declared.default != "":
            assert f"[default: {declared.default}]" in result.output, declared.key
        if declared.choices:
            assert "[" + "|".join(map(str, declared.choices)) + "]" in result.output, declared.key
    assert "--run-config" in result.output and "override" in result.output
    for key in RunSettings().to_config():  # every key is named: flag keys by their flag, the others in the epilog
        declared = next((d for d in FLAGS if d.key == key), None)
        assert (declared is not None) or key in result.output, key


#: A valid value, different from the default, for every run-config key (a new setting must be added here).
def non_default_values(tmp_path: Path) -> dict:
    return {
        "model": "srcnn", "model-preset": "small", "spatial-dims": 3, "scale": 4, "local-steps": 7, "batch-size": 3,
        "patch-size": 64, "learning-rate": 0.02, "loss": "l1:1,ssim:0.2", "device": "cpu", "seed": 11,
        "eval-max-slices": 5, "num-rounds": 9, "num-sites": 4, "min-sites": 3, "evaluate-round-zero": False,
        "node-wait-seconds": 12.5, "round-timeout": 99.0, "run-dir": str(tmp_path / "run"),
        "sites-dir": str(tmp_path / "sites"), "gan.discriminator": "local", "gan.warmup-rounds": 2,
        "gan.adversarial-weight": 0.01, "baselines": "local,pooled", "holdout-site": "site-b",
        "leave-one-out": False,  # excludes holdout-site: checked on its own below
        "resume": True, "dp": "local", "dp-unit": "patch", "dp-clip-norm": 0.5,
        "dp-clipping": "server-fixed",  # acts with dp = "central" only (dp-unit needs "local"): test_settings
        "dp-noise-multiplier": 1.2, "dp-target-epsilon": 3.0, "dp-patches-per-patient": 4,
        "transfer-dtype": "float16", "personal": "head", "condition": "acquisition", "strategy": "fedadam",
        "server-learning-rate": 0.05, "server-beta1": 0.8, "server-beta2": 0.95, "server-tau": 0.01,
        # settings of other strategies act only with theirs (test_strategies): left at their defaults here
        "proximal-mu": 0.01, "trim-fraction": 0.2, "krum-byzantine": 1,
        "fraction-train": 0.5, "fraction-evaluate": 0.5, "update-norm-limit": 3.0, "max-num-examples": 1000,
    }


def toml_pairs(values: dict) -> str:
    """``k=v ...`` as one writes it for ``flwr run --run-config`` (TOML values, strings quoted)."""
    def toml(value):
        return str(value).lower() if isinstance(value, bool) else f"'{value}'" if isinstance(value, str) else repr(value)
    return " ".join(f"{key}={toml(value)}" for key, value in values.items())


def test_run_config_reaches_the_settings_for_every_declared_key(tmp_path):
    values = non_default_values(tmp_path)
    defaults = RunSettings().to_config()
    assert set(values) == set(defaults), "add a non-default value for each new run-config key here"
    other_modes = ("leave-one-out", "dp-clipping", "proximal-mu", "trim-fraction", "krum-byzantine")
    assert all(values[key] != defaults[key] for key in values if key not in other_modes)
    settings = settings_from_command_line({}, toml_pairs(values))
    assert settings.to_config() == values
    loo = settings_from_command_line({}, toml_pairs({**values, "holdout-site": "", "leave-one-out": True}))
    assert loo.leave_one_out is True
    for key, value in settings.round_config().items():  # what travels to the sites is what was given
        assert value == values[key], key
    gan = settings_from_command_line({}, toml_pairs({"model": "gan", "model-preset": "tiny",
                                                     "gan.discriminator": "local", "gan.warmup-rounds": 2}))
    assert gan.round_config()["gan.discriminator"] == "local" and gan.round_config()["gan.warmup-rounds"] == 2


def test_run_config_takes_a_toml_file_with_family_tables(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('num-rounds = 3\nmodel = "gan"\n[gan]\ndiscriminator = "local"\n')
    settings = settings_from_command_line({}, str(path))
    assert settings.num_rounds == 3 and settings.to_config()["gan.discriminator"] == "local"


def test_explicit_flags_override_run_config_and_defaults_do_not(tmp_path, monkeypatch):
    built = []

    def stop_after_building(flags, run_config):
        built.append(settings_from_command_line(flags, run_config))
        raise ValueError("stopped by the test")

    monkeypatch.setattr(simulate_cli, "settings_from_command_line", stop_after_building)
    result = invoke("simulate", "--run-dir", str(tmp_path / "r"), "--learning-rate", "0.02",
                    "--run-config", "num-rounds=3 learning-rate=0.01 gan.discriminator='local'")
    assert result.exit_code == 2 and "stopped by the test" in result.output
    (settings,) = built
    assert settings.num_rounds == 3  # --rounds was not given: its default does not hide the run-config value
    assert settings.learning_rate == 0.02  # --learning-rate was given: it wins
    assert settings.to_config()["gan.discriminator"] == "local"
    assert settings.run_dir == str((tmp_path / "r").resolve())
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, named", [
    ("gan.discriminator='both'", "gan.discriminator"),
    ("scale=3", "scale"),
    ("num-rounds=0", "num-rounds"),
    ("num-rounds='five'", "num-rounds"),
    ("nonsense-key=1", "nonsense-key"),
    ("loss='l1,sharpness:2'", "sharpness"),
    ("model='edsr' rounds", "rounds"),
])
def test_a_bad_run_config_value_is_refused_with_its_key_named_before_anything_is_written(tmp_path, text, named):
    result = invoke("simulate", "--run-dir", str(tmp_path / "r"), "--run-config", text)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and named in result.output
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------ tables at 80 columns
def write_metrics(run_dir: Path, sites: list[str], rounds: int, baseline: str = "bicubic") -> dict:
    """A run's metrics.jsonl as the ServerApp writes it (kebab-case keys); returns its summary.json content."""
    rows = []
    for r in range(rounds + 1):
        for i, site in enumerate(sites):
            if r:
                rows.append({"round": r, "phase": "train", "site": site, "train-loss": 0.08 / r, "num-examples": 200})
            scores = {m: 30.0 + r * 0.4 + i if m == "psnr" else 0.5 - r * 0.01 for m in METRICS}
            base = {f"baseline-{m}": 29.0 + i if m == "psnr" else 0.55 for m in METRICS}
            rows.append({"round": r, "phase": "evaluate", "site": site, "baseline": baseline, **scores, **base,
                         "num-val-scans": 2, "num-val-slices": 40})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    last = {row["site"]: {k: v for k, v in row.items() if k not in ("round", "phase", "site", "baseline")}
            for row in rows if row["phase"] == "evaluate" and row["round"] == rounds}
    return {"sites": last, "rounds": rounds, "wall_seconds": 1.0, "model": "edsr"}


@pytest.mark.parametrize("num_sites, rounds", [(3, 5), (8, 50)])
def test_the_tables_fit_80_columns_with_full_site_names(tmp_path, num_sites, rounds):
    sites = [f"site-{i + 1}-{site_look(i).slug}" for i in range(num_sites)]
    assert "site-1-siemens-3t" in sites
    summary = write_metrics(tmp_path, sites, rounds, baseline="trilinear")
    follower = follower_rows(tmp_path)
    console = Console(width=80, record=True)
    console.print(round_table(follower, width=80))
    console.print(summary_table(summary, follower.baselines()))
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80, "\n".join(line for line in lines if len(line) > 80)
    for site in sites:
        assert sum(site in line for line in lines) == 2, site  # once per table, never cut
    assert "…" not in text
    assert "trilinear" in text and "bicubic" not in text  # the baseline is named for what it is
    header = next(line for line in lines if line.startswith("site") and "r0" in line).split()
    shown = [int(word[1:]) for word in header if word[:1] == "r" and word[1:].isdigit()]
    assert shown[0] == 0 and shown[-1] == rounds  # the first and the last round are always shown
    if len(shown) < rounds + 1:
        assert "rounds left out to fit" in text
    assert rounds > 10 or shown == list(range(rounds + 1))


def test_round_line_names_each_sites_baseline_gain(tmp_path):
    sites = ["site-1-siemens-3t", "site-2-ge-1.5t"]
    write_metrics(tmp_path, sites, 2, baseline="cubic-1d")
    follower = follower_rows(tmp_path)
    line = round_line(2, follower.rounds[2])
    assert line.startswith("round   2") and "loss 0.0400" in line and "cubic-1d" in line
    assert "site-1-siemens-3t 30.80 (+1.80)" in line and "site-2-ge-1.5t 31.80 (+1.80)" in line


# ------------------------------------------------------------------------------- a whole federation (slow)
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = fedsr("simulate", "--run-dir", str(run_dir), *TINY)
    out, _ = proc.communicate(timeout=600)
    return run_dir, proc.returncode, out


@pytest.mark.slow
def test_simulate_writes_every_promised_file(tiny_run):
    run_dir, code, out = tiny_run
    assert code == 0, out
    for name in ("config.toml", "metrics.jsonl", "final_model.pt", "summary.json", "flower.log", "checkpoint.pt",
                 "messages.jsonl", "cross_site.json", "report.json", "report.html"):
        assert (run_dir / name).is_file(), name
    names = sorted(json.loads((run_dir / "summary.json").read_text())["sites"])
    assert sorted(p.name for p in (run_dir / "models").iterdir()) == [f"local-{n}.pt" for n in names]  # the default
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["num-rounds"] == 2 and config["local-steps"] == 25 and config["num-sites"] == 2
    model, meta = load_checkpoint(run_dir / "final_model.pt")
    assert meta["model"]["name"] == "edsr" and meta["scale"] == 2


@pytest.mark.slow
def test_summary_has_every_site_metric(tiny_run):
    run_dir, _code, _out = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["wall_seconds"] > 0
    assert len(summary["sites"]) == 2
    for metrics in summary["sites"].values():
        for key in (*METRICS, *(f"baseline-{m}" for m in METRICS), "num-val-scans"):
            assert key in metrics
        assert metrics["num-val-scans"] >= 1


@pytest.mark.slow
def test_training_improves_psnr_over_round_zero_at_every_site(tiny_run):
    run_dir, _code, _out = tiny_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {(r["round"], r["site"]): r["psnr"] for r in rows if r["phase"] == "evaluate"}
    sites = {site for _, site in evals}
    assert len(sites) == 2
    for site in sites:
        assert evals[(2, site)] > evals[(0, site)] + 0.1, (site, evals)


@pytest.mark.slow
def test_flower_and_ray_logs_stay_off_the_terminal(tiny_run):
    run_dir, _code, out = tiny_run
    assert "round   2" in out and "Final global model" in out
    assert "Test PSNR dB" in out and "local mean" in out  # the cross-site table
    assert f"report.html: {run_dir / 'report.html'}" in out.replace("\n", "")
    assert "aggregate_train" not in out and "ClientAppActor" not in out
    assert "aggregate_train" in (run_dir / "flower.log").read_text()


@pytest.mark.slow
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
    assert proc.returncode == 2 and "--scale" in out and "'3' is not one of '2', '4'" in out
    proc = fedsr("simulate", "--run-dir", str(tmp_path / "r"), "--patch-size", "15")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error:" in out and "patch-size 15" in out
    assert not (tmp_path / "r").exists()


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
