"""The ``fedsr`` command: simulate a federation, make phantom sites, check site folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from client.training import parse_loss
from server.app import model_from_settings
from shared_models.losses import build_loss
from server.run_log import atomic_write_text, toml_dumps
from server.settings import RunSettings
from simulation.progress import MetricsFollower, follower_rows, round_line, round_table, summary_table
from simulation.runner import site_folders
from simulation.sites_report import check_site_folder, print_site_report

app = typer.Typer(
    help="fedsr: federated super-resolution for medical images.", no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold scan data and paths: never print them
)
sites_app = typer.Typer(help="Site folders: make phantom sites, check real ones.", no_args_is_help=True)
app.add_typer(sites_app, name="sites")
console = Console()
DEFAULTS = RunSettings()


@sites_app.command("make-phantoms")
def make_phantoms(
    directory: Path = typer.Argument(..., help="Folder to write one sub-folder per site into."),
    sites: int = typer.Option(3, "--sites", min=1, help="Number of phantom sites (hospitals)."),
    subjects: int = typer.Option(6, "--subjects", min=2, help="Phantom scans per site."),
    seed: int = typer.Option(0, "--seed", help="Generation seed (same seed, same phantoms)."),
) -> None:
    """Write procedural phantom sites (NIfTI + site.toml), each with its own scanner profile."""
    from simulation.phantoms import write_phantom_sites

    start = time.perf_counter()
    written = write_phantom_sites(directory, n_sites=sites, subjects_per_site=subjects, seed=seed)
    for folder in written:
        console.print(f"  {folder}")
    console.print(f"wrote {len(written)} sites in {time.perf_counter() - start:.1f} s")


@sites_app.command("check")
def check(directory: Path = typer.Argument(..., help="A site folder (scans + optional site.toml).")) -> None:
    """List what a site folder holds and every file it cannot use, with the reason."""
    usable = print_site_report(console, check_site_folder(directory))
    raise typer.Exit(0 if usable else 1)


@app.command()
def models() -> None:
    """List the model families, their presets, the dimensions they support and their parameter counts."""
    from shared_models.catalog import model_catalog

    table = Table(title="fedsr models (parameters for 1 channel, scale 2)")
    for column in ("family", "preset", "spatial dims", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for row in model_catalog():
        table.add_row(row["family"], row["preset"], ", ".join(map(str, row["spatial_dims"])), f"{row['params_2d_x2']:,}")
    console.print(table)


@app.command()
def simulate(
    sites_dir: Path | None = typer.Option(
        None, "--sites-dir", help="Folder with one sub-folder per site. Default: phantom sites in RUN_DIR/sites."
    ),
    sites: int = typer.Option(DEFAULTS.num_sites, "--sites", min=1, help="Phantom sites to generate (no --sites-dir)."),
    model: str = typer.Option(DEFAULTS.model, "--model", help="Model family: srcnn, edsr, gan, swinir, smore (fedsr models)."),
    preset: str = typer.Option(DEFAULTS.model_preset, "--preset", help="Model size preset: tiny, small, base."),
    spatial_dims: int = typer.Option(DEFAULTS.spatial_dims, "--spatial-dims", help="2 (slice by slice) or 3 (volumes)."),
    gan_discriminator: str = typer.Option(
        DEFAULTS.gan_discriminator, "--gan-discriminator", help="GAN only: federated, or local (never leaves the site)."
    ),
    scale: int = typer.Option(DEFAULTS.scale, "--scale", help="Super-resolution factor: 2 or 4."),
    rounds: int = typer.Option(DEFAULTS.num_rounds, "--rounds", min=1, help="Federated rounds."),
    local_steps: int = typer.Option(DEFAULTS.local_steps, "--local-steps", min=1, help="Optimiser steps per site per round."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", min=1, help="Patches per step."),
    patch_size: int = typer.Option(DEFAULTS.patch_size, "--patch-size", help="HR patch side in pixels."),
    learning_rate: float = typer.Option(DEFAULTS.learning_rate, "--learning-rate", help="Adam learning rate."),
    loss: str = typer.Option(
        DEFAULTS.loss, "--loss", help="Weighted terms: l1, mse, charbonnier, ssim, hfen, fft, e.g. 'l1:1,ssim:0.2'."
    ),
    min_sites: int = typer.Option(DEFAULTS.min_sites, "--min-sites", min=1, help="Sites that must reply each round."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Output folder. Default: runs/<timestamp>."),
    device: str = typer.Option(DEFAULTS.device, "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Seed for phantoms, sampling and initial weights."),
) -> None:
    """Run a whole federation on this machine with Flower's simulation engine."""
    run_dir = run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    start = time.perf_counter()
    try:  # every flag is checked before anything is written or started
        settings = RunSettings(
            num_rounds=rounds, num_sites=sites, min_sites=min_sites, local_steps=local_steps,
            batch_size=batch_size, patch_size=patch_size, learning_rate=learning_rate, loss=loss, model=model,
            model_preset=preset, spatial_dims=spatial_dims, gan_discriminator=gan_discriminator, scale=scale,
            device=device, seed=seed, run_dir=str(run_dir.resolve()),
        )
        model_from_settings(settings)  # an unknown family or a 3D request for a 2D-only family fails here
        build_loss(parse_loss(settings.loss))  # so does an unknown loss term
        if sites_dir is None:
            sites_dir = run_dir / "sites"
            if not sites_dir.exists():
                make_phantoms(sites_dir, sites=sites, subjects=6, seed=seed)
        folders = site_folders(sites_dir)
        settings = settings.replace(num_sites=len(folders), sites_dir=str(Path(sites_dir).resolve()))
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    for folder in folders:
        print_site_report(console, check_site_folder(Path(folder)), brief=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", toml_dumps(settings.to_run_config()))
    code = _follow(run_dir, settings)
    summary_path = run_dir / "summary.json"
    if code == 0 and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        summary["end_to_end_seconds"] = round(time.perf_counter() - start, 3)
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
        console.print(round_table(follower_rows(run_dir)))
        console.print(summary_table(summary))
        console.print(f"run folder: {run_dir}  ({summary['end_to_end_seconds']:.0f} s)")
    raise typer.Exit(code)


def _follow(run_dir: Path, settings: RunSettings) -> int:
    """Run the federation in a child process; show progress from metrics.jsonl; Ctrl-C stops it cleanly."""
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    log_path = run_dir / "flower.log"
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    phases = settings.num_rounds * 2 + (1 if settings.evaluate_round_zero else 0)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    with log_path.open("w") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "simulation.runner", str(run_dir)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        shown = 0
        try:
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("federation", total=phases * settings.num_sites)
                while child.poll() is None or follower.poll():
                    follower.poll()
                    progress.update(task, completed=len(follower.rows))
                    shown = _print_finished_rounds(progress.console, follower, settings, shown)
                    time.sleep(0.5)
                follower.poll()
                progress.update(task, completed=len(follower.rows))
                _print_finished_rounds(progress.console, follower, settings, shown)
        except KeyboardInterrupt:
            _stop(child)
            last = run_dir / "checkpoint.pt"
            console.print(f"[yellow]stopped.[/] last checkpoint: {last if last.exists() else 'none yet'}")
            return 130
    if child.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        console.print("[red]the federation failed[/]; end of " + str(log_path) + ":")
        console.print("\n".join(tail), markup=False, highlight=False)
    return child.returncode


def _print_finished_rounds(out: Console, follower: MetricsFollower, settings: RunSettings, shown: int) -> int:
    """Print one line per newly finished round: mean train loss and each site's PSNR (gain over bicubic)."""
    finished = [r for r in sorted(follower.rounds) if follower.finished_round(r, settings.required_sites)]
    for server_round in finished[shown:]:
        out.print(round_line(server_round, follower.rounds[server_round]), highlight=False)
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


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
