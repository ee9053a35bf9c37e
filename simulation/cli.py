"""The simulator's commands: ``fedsr simulate`` and ``fedsr sites make-phantoms``.

The ``fedsr`` root (``shared_models.cli``) names them and imports this module only when one of them runs, so a
hospital's commands never load the simulator. ``fedsr simulate`` needs Flower's simulation engine (Ray):
``pip install "fedsr[simulation]"``.

The options of ``fedsr simulate`` are derived from the run settings' declarations (``server.settings.RunSettings``):
one option per setting that declares a ``flag``, with its help, default, type and allowed values, plus
``--run-config "k=v ..."``, which takes any run-config key exactly as ``flwr run --run-config`` does. Explicit flags
override the same keys in ``--run-config``; both override the declared defaults. ``--resume RUN_DIR`` continues a
stopped run with the settings of its ``config.toml`` and takes no other setting.

``--inject SITE:KIND`` (repeatable; ``simulation.inject``) corrupts one site's replies on purpose. It is no run
setting: checked here, recorded in the run folder's ``injections.json`` and handed to the runner beside the run
config, never in it. ``--resume`` goes on with the run's recorded faults.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from client.data.files import site_folders
from client.sites_report import check_site_folder, print_site_report
from server.checkpoint import LAST, completed_rounds, resume_points, resumed_recorder
from server.run_log import atomic_write_text, check_resumed_config, read_resumed_config
from server.settings import RunSettings
from shared_models.losses import loss_from_spec
from shared_models.registry import family_options_types
from shared_models.settings import Declared, SiteSettings
from simulation.inject import (
    INJECTIONS_FILE, SYNTAX, Injection, assign, parse_injection, read_injections, write_injections,
)
from simulation.progress import MetricsFollower, print_run_end, round_line

console = Console()
#: Every run-config key's declaration: the run settings, then each model family's options (``family.option``).
DECLARED: tuple[Declared, ...] = (
    *RunSettings.declared(), *(d for kind in family_options_types().values() for d in kind.declared())
)
#: The settings that have a ``fedsr simulate`` flag, in declaration order.
FLAGS: tuple[Declared, ...] = tuple(d for d in DECLARED if d.flag)
#: Phantom scans per site when ``fedsr simulate`` writes phantom sites.
PHANTOM_SUBJECTS = 8
SIMULATION_EXTRA = 'pip install "fedsr[simulation]"'
#: Flower's key=value pattern (flwr.common.config.parse_config_args): text it does not match is ignored there.
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")

# One command each; the root names them. Locals can hold scan data and paths: tracebacks never show them.
simulate_app = typer.Typer(pretty_exceptions_show_locals=False, add_completion=False)
make_phantoms_app = typer.Typer(pretty_exceptions_show_locals=False, add_completion=False)


# ------------------------------------------------------------------------------------------------ make-phantoms
@make_phantoms_app.command("make-phantoms")
def make_phantoms(
    directory: Path = typer.Argument(..., help="Folder to write one sub-folder per site into."),
    sites: int = typer.Option(3, "--sites", min=1, help="Number of phantom sites (hospitals)."),
    subjects: int = typer.Option(PHANTOM_SUBJECTS, "--subjects", min=2, help="Phantom scans per site."),
    seed: int = typer.Option(0, "--seed", help="Generation seed (same seed, same phantoms)."),
) -> None:
    """Write procedural phantom sites (NIfTI + site.toml), each with its own scanner profile."""
    _write_phantoms(directory, sites, subjects, seed)


def _write_phantoms(directory: Path, sites: int, subjects: int, seed: int) -> list[Path]:
    from simulation.phantoms import write_phantom_sites

    start = time.perf_counter()
    written = write_phantom_sites(directory, n_sites=sites, subjects_per_site=subjects, seed=seed)
    for folder in written:
        console.print(f"  {folder}", markup=False, highlight=False)
    console.print(f"wrote {len(written)} sites in {time.perf_counter() - start:.1f} s")
    return written


# ------------------------------------------------------------------------------------------ simulate: settings
def parse_run_config(text: str | None) -> dict[str, Any]:
    """``--run-config`` as ``flwr run`` reads it (Flower's own parser): ``"k=v k2=v2"`` with TOML values (strings
    quoted: ``loss='l1'``), dotted keys for a family's options (``family.option=value``), or the path of a
    ``.toml`` file. Returns the flat ``{key: value}``.

    Raises:
        ValueError: text that is not ``key=value`` pairs, or a value that is not TOML.
    """
    from flwr.common.config import parse_config_args

    if not text or not text.strip():
        return {}
    if not text.strip().endswith(".toml"):
        leftover = _PAIR.sub("", text).strip()
        if leftover:
            raise ValueError(f"--run-config: cannot read {leftover!r}; give space-separated key=value pairs")
    try:
        return dict(parse_config_args([text.strip()]))
    except click.ClickException as error:
        raise ValueError(f"--run-config: {error.message} Strings are quoted: loss='l1'.") from None


def settings_from_command_line(
    flags: Mapping[str, Any], run_config: str | None = None, *, now: datetime | None = None
) -> RunSettings:
    """The run's settings: declared defaults, then ``--run-config``, then the flags the user gave (``flags``:
    :func:`parameter_name` -> value; a None value counts as not given). ``run-dir`` defaults to
    ``runs/<timestamp>``; it and ``sites-dir`` become absolute.

    Every value is checked here (types, allowed values, the model and the loss), before anything is written.

    Raises:
        ValueError: an unknown key or a bad value; the message names the key.
    """
    config = parse_run_config(run_config)
    config.update({d.key: flags[parameter_name(d)] for d in FLAGS if flags.get(parameter_name(d)) is not None})
    settings = RunSettings.from_run_config(config)
    loss_from_spec(settings.loss)  # an unknown loss term or a bad weight fails here, not at the sites
    run_dir = settings.run_dir or str(Path("runs") / (now or datetime.now()).strftime("%Y%m%d-%H%M%S"))
    sites_dir = settings.sites_dir and str(Path(settings.sites_dir).expanduser().resolve())
    return settings.replace(run_dir=str(Path(run_dir).expanduser().resolve()), sites_dir=sites_dir)


def resumed_settings(run_dir: Path, given: Mapping[str, Any], run_config: str | None) -> RunSettings:
    """The settings to continue the run in ``run_dir`` with: its ``config.toml``, ``resume`` on, ``run-dir`` this
    folder (absolute). ``given`` (the flags the user set, as :func:`settings_from_command_line` takes them) and
    ``run_config`` must be empty: a run goes on as it began.

    Raises:
        ValueError: a flag or ``--run-config`` given (named); no ``config.toml`` in ``run_dir`` (a ResumeError
            naming it).
    """
    flags = {parameter_name(d): d.flag for d in FLAGS}
    refused = [flags[name] for name in given if name in flags] + (["--run-config"] if run_config else [])
    if refused:
        raise ValueError(f"--resume continues the run with the settings in {run_dir / 'config.toml'}; "
                         f"leave out {', '.join(refused)}")
    run_dir = run_dir.expanduser().resolve()
    settings = RunSettings.from_run_config(read_resumed_config(run_dir))
    return settings.replace(resume=True, run_dir=str(run_dir))


def parameter_name(declared: Declared) -> str:
    """The Python name of a setting's option: ``num-rounds`` -> ``num_rounds``, ``family.some-option`` ->
    ``family_some_option``."""
    return declared.key.replace(".", "_").replace("-", "_")


_SITE_KEYS = {d.key for d in SiteSettings.declared()}


def _option(declared: Declared) -> Any:
    """The ``typer.Option`` of one declared setting: its flag, help, default, type and allowed values."""
    names = [declared.flag]
    if declared.kind is bool:
        names = [f"{declared.flag}/--no-{declared.flag.removeprefix('--')}"]
    click_type: click.ParamType | None = None
    if declared.choices is not None:
        click_type = click.Choice(declared.choices)
    elif declared.kind in (int, float) and (declared.minimum is not None or declared.positive):
        kind_range = click.IntRange if declared.kind is int else click.FloatRange
        click_type = kind_range(min=0 if declared.positive else declared.minimum, min_open=declared.positive)
    family, dot, _ = declared.key.partition(".")
    panel = f"Options of the {family} family" if dot else "Sent to every site" if declared.key in _SITE_KEYS else "Run"
    return typer.Option(
        declared.default, *names, help=escape(declared.help), show_default=declared.default != "",
        click_type=click_type, rich_help_panel=panel,
    )


def _toml(value: Any) -> str:
    """A default as it is written in ``--run-config`` (TOML): true, 3, 0.5, 'text'."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _run_config_help() -> str:
    without_flag = ", ".join(d.key for d in DECLARED if not d.flag)
    return (
        "Any run-config key, as `flwr run --run-config` takes it: \"k=v k2=v2\" with TOML values (strings quoted: "
        "loss='l1:1,ssim:0.2' family.option=value), or a .toml file. Flags given explicitly override the same key here. "
        f"Keys without a flag (listed below): {without_flag}."
    )


def _run_config_epilog() -> str:
    lines = ["Run-config keys without a flag (set them with --run-config):"]
    lines += [f"{d.key} = {_toml(d.default)}: {escape(d.help)}" for d in DECLARED if not d.flag]
    return "\n\n".join(lines)


# --------------------------------------------------------------------------------------------------- simulate
def simulate(ctx: typer.Context, **values: Any) -> None:
    """Run a whole federation on this machine with Flower's simulation engine.

    Sites: the sub-folders of --sites-dir, or --sites phantom sites written to RUN_DIR/sites.
    Needs the simulation extra: pip install "fedsr\\[simulation]".
    """
    start = time.perf_counter()
    if importlib.util.find_spec("ray") is None:
        _fail(f"fedsr simulate needs Flower's simulation engine (Ray), which is not installed: {SIMULATION_EXTRA}", 1)
    run_config = values.pop("run_config", None)
    resume = values.pop("resume_dir", None)
    inject = values.pop("inject", None) or []
    given = {name: value for name, value in values.items() if _given(ctx, name)}
    try:  # every value is checked before anything is written or started
        injections = [parse_injection(spec) for spec in inject]
        if resume is None:
            settings = settings_from_command_line(given, run_config)
        else:
            settings = resumed_settings(resume, given, run_config)
        run_dir = Path(settings.run_dir)
        if settings.resume and inject:
            raise ValueError(f"a resumed run goes on with the faults recorded in {run_dir / INJECTIONS_FILE} (if "
                             "any); leave out --inject")
        if settings.resume:  # (also through --run-config) what would stop the ServerApp, said before anything starts
            check_resumed_config(run_dir, settings.to_config())
            completed_rounds(run_dir)
        sites_dir = Path(settings.sites_dir) if settings.sites_dir else run_dir / "sites"
        if not settings.sites_dir and not sites_dir.exists():
            _write_phantoms(sites_dir, settings.num_sites, PHANTOM_SUBJECTS, settings.seed)
        folders = site_folders(sites_dir)
        if settings.sites_dir and given.get("num_sites") not in (None, len(folders)):
            console.print(f"[yellow]note:[/] --sites {given['num_sites']} ignored: {escape(str(sites_dir))} holds "
                          f"{len(folders)} sites", highlight=False)
        settings = settings.replace(num_sites=len(folders), sites_dir=str(sites_dir.resolve()))
        by_site = assign(read_injections(run_dir) if settings.resume else injections, folders)  # names checked
        faults = [fault for site_faults in by_site.values() for fault in site_faults]
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error), 2)
    for folder in folders:
        print_site_report(console, check_site_folder(Path(folder)), brief=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not settings.resume:
        record_injections(run_dir, faults)
    for fault in faults:
        console.print(f"[yellow]warning:[/] fault injected at site {escape(fault.site)} ({escape(fault.spec)}): "
                      f"{fault.effect}", highlight=False)
    code = _follow(run_dir, settings, faults)
    summary_path = run_dir / "summary.json"
    if code == 0 and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        summary["end_to_end_seconds"] = round(time.perf_counter() - start, 3)
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
        print_run_end(console, run_dir, main_experiment(settings), summary)
        console.print(f"run folder: {run_dir}  ({summary['end_to_end_seconds']:.0f} s)", markup=False, highlight=False)
    raise typer.Exit(code)


def record_injections(run_dir: Path, faults: list[Injection]) -> None:
    """A new run's ``injections.json`` (:func:`simulation.inject.write_injections`), or, without faults, no such
    file: one left by an earlier run in the same folder is removed."""
    if faults:
        write_injections(run_dir, faults)
    else:
        (run_dir / INJECTIONS_FILE).unlink(missing_ok=True)


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the user set option ``name`` (on the command line or through its environment variable)."""
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


def _declared_signature() -> inspect.Signature:
    """``simulate``'s parameters: one option per declared flag, then ``--run-config`` (typer reads these)."""
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [
        inspect.Parameter(parameter_name(d), inspect.Parameter.KEYWORD_ONLY, default=_option(d), annotation=d.kind)
        for d in FLAGS
    ]
    params.append(inspect.Parameter(
        "run_config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
        default=typer.Option(None, "--run-config", help=_run_config_help(), metavar="'K=V K2=V2' | FILE.toml",
                             rich_help_panel="Run"),
    ))
    params.append(inspect.Parameter(
        "resume_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--resume", metavar="RUN_DIR", rich_help_panel="Run", help=(
            "Continue the stopped run in RUN_DIR from its last completed round, with the settings of its "
            "config.toml (no other setting may be given). Its final weights are those of an uninterrupted run.")),
    ))
    params.append(inspect.Parameter(
        "inject", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
        default=typer.Option(None, "--inject", metavar="SITE:KIND", rich_help_panel="Fault injection (simulation only)",
                             help=escape(
            f"Corrupt one site's replies on purpose (repeatable): {SYNTAX}. SITE: its site.toml name or folder. "
            "nan: NaN weights and NaN psnr; scale:F: update x F; random: N(0,1) weights; examples:N: num-examples "
            "N; drop[:R]: from round R on the site answers with an error. Recorded in RUN_DIR/injections.json.")),
    ))
    return inspect.Signature(params)


simulate.__signature__ = _declared_signature()  # type: ignore[attr-defined]
simulate.__annotations__ = {p.name: p.annotation for p in simulate.__signature__.parameters.values()}
simulate_app.command("simulate", epilog=_run_config_epilog())(simulate)


def _fail(message: str, code: int) -> NoReturn:
    console.print(f"[red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _follow(run_dir: Path, settings: RunSettings, faults: list[Injection]) -> int:
    """Run the federation in a child process, with the ``faults`` injected; show progress from metrics.jsonl;
    Ctrl-C stops it cleanly.

    A resumed run keeps the record of its completed rounds (trimmed here as the ServerApp trims it, before the
    follower reads it) and appends to ``flower.log``."""
    if settings.resume:
        states = completed_rounds(run_dir)
        resumed_recorder(run_dir, states)
        console.print(f"resuming {resume_points(states)} of {settings.num_rounds}", markup=False, highlight=False)
    else:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    log_path = run_dir / "flower.log"
    follower = MetricsFollower(run_dir / "metrics.jsonl", main_experiment(settings))
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    with log_path.open("a" if settings.resume else "w") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "simulation.runner", json.dumps(settings.to_config()),
             json.dumps([fault.spec for fault in faults])],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        shown = 0
        try:
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("training", total=expected_rows(settings))
                while child.poll() is None or follower.poll():
                    follower.poll()
                    progress.update(task, completed=len(follower.rows), description=current_part(run_dir))
                    shown = _print_finished_rounds(progress.console, follower, settings, shown)
                    time.sleep(0.5)
                follower.poll()
                progress.update(task, completed=len(follower.rows))
                _print_finished_rounds(progress.console, follower, settings, shown)
        except KeyboardInterrupt:
            _stop(child)
            last = run_dir / LAST
            console.print(f"[yellow]stopped.[/] last checkpoint: {escape(str(last)) if last.exists() else 'none yet'}",
                          highlight=False)
            if last.exists():
                console.print(f"continue with: fedsr simulate --resume {shlex.quote(str(run_dir))}", markup=False,
                              highlight=False)
            return 130
    if child.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        console.print(f"[red]the federation failed[/]; end of {escape(str(log_path))}:", highlight=False)
        console.print("\n".join(tail), markup=False, highlight=False)
    return child.returncode


def current_part(run_dir: Path) -> str:
    """What the run is doing now, from the last message the coordinator sent (``messages.jsonl``): ``global``,
    ``holdout:SITE``, ``local`` / ``pooled`` (the baselines) or ``cross-site`` (the final evaluation)."""
    path = run_dir / "messages.jsonl"
    if not path.exists():
        return "starting"
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - 4096))
        lines = handle.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return str(json.loads(line)["part"])
        except (ValueError, KeyError):
            continue  # a partly written or cut line
    return "starting"


def main_experiment(settings: RunSettings) -> str:
    """The run's main federated model, whose rounds the progress lines show: ``global`` or ``holdout:SITE``."""
    return f"holdout:{settings.holdout_site}" if settings.holdout_site else "global"


def expected_rows(settings: RunSettings) -> int:
    """How many rows the ServerApp appends to ``metrics.jsonl`` in a run that goes well: train and evaluate per
    round and site for each federation (round 0 once), one per local-only model and one for the pooled model."""
    sites, rounds = settings.num_sites, settings.num_rounds
    trainers = sites - 1 if settings.holdout_site else sites
    rows = (2 * rounds + (1 if settings.evaluate_round_zero else 0)) * trainers
    if settings.leave_one_out:
        rows += sites * 2 * rounds * (sites - 1)
    kinds = settings.baseline_kinds
    return rows + (trainers if "local" in kinds else 0) + (1 if "pooled" in kinds else 0)


def _print_finished_rounds(out: Console, follower: MetricsFollower, settings: RunSettings, shown: int) -> int:
    """Print one line per newly finished round: mean train loss and each site's PSNR (gain over its baseline)."""
    finished = [r for r in sorted(follower.rounds) if follower.finished_round(r, settings.required_sites)]
    for server_round in finished[shown:]:
        out.print(round_line(server_round, follower.rounds[server_round]), markup=False, highlight=False)
    return max(shown, len(finished))


def _stop(child: subprocess.Popen) -> None:
    """Ask the federation to stop (SIGTERM lets Flower and Ray shut down), then kill what remains."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


if __name__ == "__main__":  # ``python -m simulation.cli ...`` is the whole ``fedsr`` command
    from shared_models.cli import main

    main()
