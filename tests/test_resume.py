"""``--resume RUN_DIR``: a run stopped mid-federation goes on from its last completed round and ends with the very
weights of a run that was never stopped; a folder that cannot be resumed is refused, naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from typer.testing import CliRunner

from server.checkpoint import CHECKPOINTS, FINAL, LAST, completed_rounds, read_round, write_global
from server.run_log import ResumeError, RunRecorder, check_resumed_config, keep_completed_rows, write_run_config
from server.settings import RunSettings
from shared_models.checkpoint import CheckpointError
from shared_models.cli import app as root_app
from shared_models.registry import build_from_settings, family
from simulation.cli import PHANTOM_SUBJECTS
from simulation.phantoms import write_phantom_sites

ROUNDS = 3
TINY = ["--rounds", str(ROUNDS), "--local-steps", "4", "--batch-size", "4", "--patch-size", "32", "--baselines", "none",
        "--run-config", "eval-max-slices=4"]


@dataclass
class Finished:
    """A ``fedsr simulate`` that ended: its exit code and terminal output."""

    code: int
    out: str


class Simulate:
    """``fedsr simulate ARGS`` in its own session (so that a SIGINT to its group is the terminal's Ctrl-C), its
    output in a file (two runs at once never block on a full pipe)."""

    def __init__(self, out: Path, *args: str) -> None:
        self.out = out
        with out.open("w") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "shared_models.cli", "simulate", *args],
                                         stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, COLUMNS="200"))

    def wait(self, timeout: float) -> Finished:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        return Finished(code, self.out.read_text())


def rows(run_dir: Path) -> list[dict]:
    """The complete lines of ``metrics.jsonl`` (one being written is left out)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def stop_during_round_two(run: Simulate, run_dir: Path) -> Finished:
    """Ctrl-C once round 1 has completed and the sites train round 2 (their first train rows are in)."""
    deadline = time.monotonic() + 240
    while not any(row["round"] == 2 for row in rows(run_dir)):
        assert run.proc.poll() is None, run.out.read_text()
        assert time.monotonic() < deadline, "round 2 never started"
        time.sleep(0.1)
    os.killpg(run.proc.pid, signal.SIGINT)
    return run.wait(timeout=90)


@dataclass
class Runs:
    whole: Path
    stopped: Path
    at_stop: Finished
    round_at_stop: int
    rows_at_stop: list[dict]
    resumed: Finished


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """The same tiny federation of two phantom sites twice, at once: once to the end; once stopped during round 2,
    then resumed. The sites are written once (as ``fedsr simulate`` writes them), for both runs."""
    root = tmp_path_factory.mktemp("resume")
    sites = ["--sites-dir", str(root / "sites")]
    write_phantom_sites(root / "sites", n_sites=2, subjects_per_site=PHANTOM_SUBJECTS, seed=0)
    whole = Simulate(root / "whole.out", "--run-dir", str(root / "whole"), *sites, *TINY)
    try:
        stopping = Simulate(root / "stopped.out", "--run-dir", str(root / "stopped"), *sites, *TINY)
        at_stop = stop_during_round_two(stopping, root / "stopped")
        round_at_stop = completed_rounds(root / "stopped")["global"].round
        rows_at_stop = rows(root / "stopped")
        resumed = Simulate(root / "resumed.out", "--resume", str(root / "stopped")).wait(timeout=300)
        assert whole.wait(timeout=300).code == 0, whole.out.read_text()
    finally:
        if whole.proc.poll() is None:
            os.killpg(whole.proc.pid, signal.SIGKILL)
    return Runs(root / "whole", root / "stopped", at_stop, round_at_stop, rows_at_stop, resumed)


@pytest.mark.slow
def test_the_resumed_run_ends_with_the_weights_of_a_run_never_stopped(runs):
    assert runs.at_stop.code == 130, runs.at_stop.out
    assert f"continue with: fedsr simulate --resume {runs.stopped}" in runs.at_stop.out.replace("\n", "")
    assert 1 <= runs.round_at_stop < ROUNDS
    assert runs.resumed.code == 0, runs.resumed.out
    assert f"resuming global after round {runs.round_at_stop} of {ROUNDS}" in runs.resumed.out
    resumed = torch.load(runs.stopped / "final_model.pt", weights_only=True)
    whole = torch.load(runs.whole / "final_model.pt", weights_only=True)
    assert resumed["extra"]["round"] == whole["extra"]["round"] == ROUNDS
    assert resumed["state_dict"].keys() == whole["state_dict"].keys()
    for key, weights in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], weights), key
    assert completed_rounds(runs.stopped)["global"].round == ROUNDS
    assert json.loads((runs.stopped / "summary.json").read_text())["rounds"] == ROUNDS


def timeless(row: dict) -> dict:
    """A row without what the clock decides (``time``, ``*-seconds``)."""
    return {key: value for key, value in row.items() if key != "time" and not key.endswith("-seconds")}


@pytest.mark.slow
def test_every_round_is_recorded_once_with_the_numbers_of_the_run_never_stopped(runs):
    def by_key(run_rows: list[dict]) -> dict:
        keyed = {(r["experiment"], r["round"], r["phase"], r["site"]): timeless(r) for r in run_rows}
        assert len(keyed) == len(run_rows), "a row recorded twice"
        return keyed

    resumed, whole = by_key(rows(runs.stopped)), by_key(rows(runs.whole))
    assert resumed == whole
    assert sorted({key[1] for key in resumed}) == list(range(ROUNDS + 1))
    # the stop came once round 2's train rows were in: whatever round 2 had recorded is there once, not twice
    assert any(row["round"] == 2 for row in runs.rows_at_stop)
    assert len(rows(runs.stopped)) == len(rows(runs.whole))
    summary = json.loads((runs.stopped / "summary.json").read_text())["sites"]
    last = {site: {k: v for k, v in row.items() if k not in ("experiment", "round", "phase", "site")}
            for (_, server_round, phase, site), row in whole.items() if server_round == ROUNDS and phase == "evaluate"}
    assert {site: timeless(metrics) for site, metrics in summary.items()} == last
    times = [row["time"] for row in rows(runs.stopped)]
    assert times == sorted(times)  # the resumed rows go on from the stopped run's clock


# ----------------------------------------------------------------------------- what cannot be resumed, and why
def invoke(*args: str):
    return CliRunner().invoke(root_app, list(args), env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})


def started_run(run_dir: Path) -> Path:
    """A run folder as the ServerApp leaves it before its first round completes: config.toml, no checkpoint."""
    run_dir.mkdir()
    write_run_config(run_dir, RunSettings(run_dir=str(run_dir), num_rounds=ROUNDS).to_config())
    return run_dir


def test_a_run_without_a_checkpoint_is_refused_naming_the_file(tmp_path):
    run_dir = started_run(tmp_path / "run")
    result = invoke("simulate", "--resume", str(run_dir))
    assert result.exit_code == 2
    assert str(run_dir / LAST) in result.output.replace("\n", "") and "without resume" in result.output
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml"]  # nothing started, nothing written


def test_a_folder_without_config_is_refused_naming_the_file(tmp_path):
    result = invoke("simulate", "--resume", str(tmp_path))
    assert result.exit_code == 2 and str(tmp_path / "config.toml") in result.output.replace("\n", "")


def test_resume_takes_no_setting_that_would_change_the_run(tmp_path):
    run_dir = started_run(tmp_path / "run")
    result = invoke("simulate", "--resume", str(run_dir), "--rounds", "5", "--seed", "2", "--run-config", "seed=3")
    assert result.exit_code == 2
    for flag in ("--rounds", "--seed", "--run-config"):
        assert flag in result.output, flag
    assert "--sites" not in result.output  # only what was given is named


def test_resume_through_run_config_is_checked_before_anything_starts(tmp_path):
    run_dir = started_run(tmp_path / "run")
    result = invoke("simulate", "--run-dir", str(run_dir), "--rounds", str(ROUNDS + 1), "--run-config", "resume=true")
    assert result.exit_code == 2
    assert str(run_dir / "config.toml") in result.output.replace("\n", "") and "num-rounds" in result.output
    result = invoke("simulate", "--run-dir", str(run_dir), "--rounds", str(ROUNDS), "--run-config", "resume=true")
    assert result.exit_code == 2 and str(run_dir / LAST) in result.output.replace("\n", "")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml"]


def test_settings_that_differ_from_the_runs_config_are_named(tmp_path):
    run_dir = started_run(tmp_path / "run")
    same = RunSettings(run_dir=str(tmp_path / "moved"), num_rounds=ROUNDS, resume=True).to_config()
    check_resumed_config(run_dir, same)  # the folder may move; resume is the switch itself
    with pytest.raises(ResumeError) as error:
        check_resumed_config(run_dir, {**same, "num-rounds": ROUNDS + 1, "seed": 7})
    assert error.value.path == str(run_dir / "config.toml")
    assert "num-rounds" in error.value.problem and "seed" in error.value.problem
    assert "local-steps" not in error.value.problem


def test_resume_requires_a_run_dir():
    with pytest.raises(ValueError, match="resume needs run-dir"):
        RunSettings(resume=True)


# ------------------------------------------------------------------------------------- the run record, trimmed
def test_rows_of_unfinished_rounds_are_dropped_once(tmp_path):
    recorder = RunRecorder(tmp_path)
    written = []
    for experiment, last in (("global", 2), ("holdout:b", 1), ("local:a", 1)):
        for server_round in range(last + 1):
            for phase in ("train", "evaluate"):
                recorder.record(server_round, phase, "a", {"psnr": float(server_round)}, {}, experiment)
                written.append((experiment, server_round, phase))
    with recorder.path.open("a") as handle:
        handle.write('{"experiment": "global", "round": 3, "pha')  # cut by the stop
    completed = {"global": 1, "holdout:b": 1}  # global's round 2 did not complete; local:a is a baseline

    resumed = RunRecorder(tmp_path)
    dropped = resumed.resume(completed)
    kept = [(r["experiment"], r["round"], r["phase"]) for r in map(json.loads, recorder.path.read_text().splitlines())]
    assert kept == [key for key in written if key[1] <= completed.get(key[0], -1)]
    assert dropped == len(written) + 1 - len(kept)
    assert resumed.latest_evaluation == {"global": {"a": {"psnr": 1.0}}, "holdout:b": {"a": {"psnr": 1.0}}}
    before = recorder.path.stat().st_mtime_ns
    assert keep_completed_rows(recorder.path, completed)[1] == 0  # a second trim changes nothing
    assert recorder.path.stat().st_mtime_ns == before


# ----------------------------------------------------------------------------------- round checkpoints, read back
def test_every_federations_round_checkpoint_is_read_back_with_its_weights(tmp_path):
    settings = RunSettings(run_dir=str(tmp_path), seed=1)
    model = build_from_settings(settings)
    trained = {key: value + 0.5 for key, value in family(settings.model).shared_state(model, None).items()}
    rules = {"site-a": {"modality": "MR", "kind": "percentile", "range": [0.0, 1.0]}}
    for name, experiment, round_ in ((LAST, "global", 3), (f"{CHECKPOINTS}/holdout-site-a.pt", "holdout:site-a", 1)):
        write_global(tmp_path, model, ArrayRecord(trained), settings=settings, normalisation=rules, name=name,
                     round_=round_, experiment=experiment)

    states = completed_rounds(tmp_path)
    assert {name: state.round for name, state in states.items()} == {"global": 3, "holdout:site-a": 1}
    assert states["global"].normalisation == rules
    arrays = states["holdout:site-a"].arrays(build_from_settings(settings), None).to_torch_state_dict()
    assert arrays.keys() == trained.keys()
    assert all(torch.equal(arrays[key], value) for key, value in trained.items())


def test_a_finished_model_or_another_architecture_is_not_resumed_from(tmp_path):
    settings = RunSettings(run_dir=str(tmp_path))
    model = build_from_settings(settings)
    weights = ArrayRecord(family(settings.model).shared_state(model, None))
    write_global(tmp_path, model, weights, settings=settings, normalisation={}, name=FINAL, round_=3)
    with pytest.raises(ResumeError, match="no federation round") as error:
        read_round(tmp_path / FINAL)
    assert error.value.path == str(tmp_path / FINAL)

    write_global(tmp_path, model, weights, settings=settings, normalisation={}, name=LAST, round_=2,
                 experiment="global")
    larger = build_from_settings(settings.replace(model_preset="small"))
    with pytest.raises(ResumeError, match="the run's settings build") as error:
        read_round(tmp_path / LAST).arrays(larger, None)
    assert error.value.path == str(tmp_path / LAST)

    (tmp_path / LAST).write_bytes((tmp_path / LAST).read_bytes()[:100])  # cut short
    with pytest.raises(CheckpointError, match="truncated"):
        completed_rounds(tmp_path)
