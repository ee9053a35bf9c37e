"""``flwr run .`` as the README tells a user to run it (Flower's simulation runtime), end to end, beside
``fedsr simulate`` with the same settings: both must give the same run folder.

The command is the README's own (section "Running with `flwr run`"), with tiny settings put in its
``--federation-config`` and ``--run-config``. ``flwr run`` starts a local SuperLink in the background when none
answers on ``127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` (Flower 1.42's ``:local:`` connection of the default
``$FLWR_HOME/config.toml``) and leaves it running. The test gives it its own ``FLWR_HOME`` and free ports (other
runs on the machine keep theirs), checks the run's final status with ``flwr list``, then stops that SuperLink by
its pid and checks that every process started under its ``FLWR_HOME`` ended (no orphan ``flower-superlink``,
SuperExec, simulation or Ray process).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.common.config import parse_config_args

from client.data.files import site_folders
from deploy.launch import free_port
from flower_processes import FlwrCli
from shared_models.checkpoint import load_checkpoint
from simulation.phantoms import write_phantom_sites

ROOT = Path(__file__).resolve().parents[1]
#: The tiny run both commands make (run-config keys); num-sites is the number of site folders, as the README says.
TINY = {"num-sites": 2, "num-rounds": 2, "local-steps": 4, "batch-size": 4, "patch-size": 32, "eval-max-slices": 4,
        "baselines": "none"}
#: Row keys of metrics.jsonl that measure time, not the model: they differ between any two runs.
CLOCKS = ("time", "train-seconds", "eval-seconds")
#: How long the local SuperLink and everything it started may take to end after SIGTERM (seconds).
STOP_SECONDS = 30


# ------------------------------------------------------------------------------------ the README's command
def readme_commands() -> tuple[list[str], dict[str, str]]:
    """The ``flwr run`` command of the README's "Running with `flwr run`" section (argv) and the variables its
    ``export`` lines set."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Running with `flwr run`", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's flwr run section has no bash block"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    exports = dict(line.split(None, 1)[1].split("=", 1) for line in lines if line.startswith("export "))
    runs = [shlex.split(line, comments=True) for line in lines if line.startswith("flwr run")]
    assert len(runs) == 1, lines
    return runs[0], exports


def toml_pairs(values: dict) -> str:
    """``k=v k2=v2`` as ``--run-config`` and ``--federation-config`` take them (TOML values: strings quoted)."""
    def toml(value) -> str:
        return f"'{value}'" if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)

    return " ".join(f"{key}={toml(value)}" for key, value in values.items())


def with_settings(argv: list[str], federation: dict, run_config: dict) -> list[str]:
    """``argv`` with the values of its ``--federation-config`` and ``--run-config`` updated."""
    out = list(argv)
    for flag, values in (("--federation-config", federation), ("--run-config", run_config)):
        assert flag in out, f"the README's command has no {flag}"
        at = out.index(flag) + 1
        out[at] = toml_pairs({**parse_config_args([out[at]]), **values})
    return out


def test_the_readme_command_is_a_flwr_run_of_this_app_that_uses_the_installed_environment():
    argv, exports = readme_commands()
    assert argv[:3] == ["flwr", "run", "."] and "--stream" in argv
    assert exports.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1"
    run_config = parse_config_args([argv[argv.index("--run-config") + 1]])
    federation = parse_config_args([argv[argv.index("--federation-config") + 1]])
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(run_config) <= set(declared)  # flwr run refuses keys the app does not declare
    assert Path(str(run_config["run-dir"])).is_absolute() and Path(str(run_config["sites-dir"])).is_absolute()
    assert federation["num-supernodes"] == run_config.get("num-sites", declared["num-sites"])


# ------------------------------------------------------------------------------------------------ processes
def processes_under(home: Path) -> dict[int, str]:
    """pid -> command line of every live process of this user started with ``FLWR_HOME=home`` (children inherit
    it: the SuperLink, its SuperExec, the simulation and its Ray workers)."""
    marker = f"FLWR_HOME={home}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def wait_until_gone(home: Path, seconds: float) -> dict[int, str]:
    """The processes under ``home`` still alive after ``seconds`` (empty when all ended)."""
    deadline = time.monotonic() + seconds
    while (left := processes_under(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_all(home: Path) -> None:
    for pid in processes_under(home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------------------- the two runs (slow)
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flwr-run")
    sites = root / "sites"
    write_phantom_sites(sites, n_sites=2, subjects_per_site=5, shape=(48, 48, 16))
    home = root / "flwr-home"
    argv, exports = readme_commands()
    env = dict(
        os.environ, **exports, FLWR_HOME=str(home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    command = with_settings(argv, {"num-supernodes": 2},
                            {**TINY, "sites-dir": str(sites), "run-dir": str(root / "flwr")})
    outcome: dict = {}
    try:
        with (root / "flwr-run.log").open("w") as log:
            outcome["flwr-run"] = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                 timeout=600).returncode
        outcome["output"] = (root / "flwr-run.log").read_text(errors="replace")
        # while the SuperLink runs: once it is stopped, any `flwr` command on this connection would start a new one
        flwr = FlwrCli(home, name="local")  # the default config's connection, which flwr run used
        flwr.env.update(env)
        outcome["runs"] = flwr.flwr_json("list")["runs"]
        superlinks = [pid for pid, line in processes_under(home).items() if "flower-superlink" in line]
        outcome["superlinks"] = len(superlinks)
        for pid in superlinks:
            os.kill(pid, signal.SIGTERM)
        outcome["left"] = wait_until_gone(home, STOP_SECONDS)
    finally:
        kill_all(home)  # whatever a failure left behind, by pid
    simulate = subprocess.run(
        [sys.executable, "-m", "shared_models.cli", "simulate", "--run-dir", str(root / "simulate"),
         "--sites-dir", str(sites), "--run-config", toml_pairs(TINY)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="200"),
    )
    outcome["simulate"], outcome["simulate-output"] = simulate.returncode, simulate.stdout + simulate.stderr
    return root, outcome


def files(run_dir: Path) -> set[str]:
    return {str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file()}


def rows(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.mark.slow
def test_flwr_run_finishes_and_flower_lists_the_run_as_completed(runs):
    _root, outcome = runs
    assert outcome["flwr-run"] == 0, outcome["output"][-3000:]
    started = re.search(r"Successfully started run (\d+)", outcome["output"])
    assert started, outcome["output"][-3000:]
    assert [(run["run-id"], run["status"]) for run in outcome["runs"]] == [(started[1], "finished:completed")]


@pytest.mark.slow
def test_the_local_superlink_is_stopped_by_pid_and_leaves_no_process_behind(runs):
    _root, outcome = runs
    assert outcome["superlinks"] == 1  # flwr run started exactly one, under this test's FLWR_HOME
    assert outcome["left"] == {}, outcome["left"]


@pytest.mark.slow
def test_flwr_run_writes_the_same_run_folder_as_fedsr_simulate(runs):
    root, outcome = runs
    assert outcome["simulate"] == 0, outcome["simulate-output"][-3000:]
    flwr, simulate = root / "flwr", root / "simulate"
    # flower.log holds the simulator's own output (Flower's and Ray's lines); under flwr run they are streamed
    assert files(simulate) - {"flower.log"} == files(flwr)
    assert {"final_model.pt", "summary.json", "metrics.jsonl", "report.html"} <= files(flwr)
    configs = [tomllib.loads((run / "config.toml").read_text()) for run in (flwr, simulate)]
    assert configs[0] == {**configs[1], "run-dir": str(flwr)}
    assert {key: configs[0][key] for key in TINY} == TINY


@pytest.mark.slow
def test_both_runs_number_the_sites_alike_and_train_them_alike(runs):
    root, _outcome = runs
    flwr, simulate = root / "flwr", root / "simulate"
    partitions = [Path(folder).name for folder in site_folders(root / "sites")]  # partition id -> site folder
    summaries = [json.loads((run / "summary.json").read_text()) for run in (flwr, simulate)]
    assert list(summaries[0]["sites"]) == list(summaries[1]["sites"]) == partitions  # the folders' site.toml names
    # row by row: the same sites in the same order, with the same scores (each site trained on its own scans)
    records = [rows(run, "metrics.jsonl") for run in (flwr, simulate)]
    assert len(records[0]) == len(records[1]) == 2 * 2 * 2 + 2  # train + evaluate per round and site, round 0
    for ours, theirs in zip(*records):
        assert ours.keys() == theirs.keys()
        for key in ours.keys() - set(CLOCKS):
            assert ours[key] == (pytest.approx(theirs[key], rel=1e-4) if isinstance(theirs[key], float)
                                 else theirs[key]), (key, ours)
    # the same messages to the same sites (query.describe goes to node ids, which differ between runs)
    sent = [[(m["part"], m["type"], m["site"] if m["part"] != "describe" else "") for m in rows(run, "messages.jsonl")]
            for run in (flwr, simulate)]
    assert sent[0] == sent[1]
    models = [load_checkpoint(run / "final_model.pt") for run in (flwr, simulate)]
    assert models[0][1]["extra"]["round"] == models[1][1]["extra"]["round"] == 2
    for (name, ours), theirs in zip(models[0][0].state_dict().items(), models[1][0].state_dict().values()):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6), name
