"""Runs one federation on Flower's simulation engine: the ClientApp and ServerApp composed, nothing added.

Started by ``fedsr simulate`` as ``python -m simulation.runner RUN_DIR`` in a process of its own, so that
Flower's and Ray's output goes to ``RUN_DIR/flower.log`` and Ctrl-C can stop the whole federation at once.
The settings come from ``RUN_DIR/config.toml``; each sub-folder of ``sites-dir`` is one simulated site.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tomllib
from pathlib import Path

import torch

from client.app import build_client_app
from server.app import build_server_app
from server.settings import RunSettings


def site_folders(sites_dir: str | Path) -> list[str]:
    """The site folders of a federation: the sub-folders of ``sites_dir``, sorted by name."""
    root = Path(sites_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sites folder {root} does not exist; create it or use `fedsr sites make-phantoms`")
    folders = sorted(str(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"sites folder {root} has no site sub-folders (one folder per site)")
    return folders


def backend_config(settings: RunSettings, num_sites: int) -> dict:
    """Ray resources: every simulated site runs at once, sharing the CPUs equally (and the GPU, if used).

    With more sites than cores each gets a fraction of a core, so all sites train concurrently and no round
    waits for a second wave of sites (:func:`threads_per_site` keeps each to its share of threads).
    """
    uses_gpu = settings.device != "cpu" and torch.cuda.is_available()
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": cpus / num_sites, "num_gpus": 1.0 / min(num_sites, 4) if uses_gpu else 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 1 if uses_gpu else 0, "log_to_driver": True},
    }


def threads_per_site(num_sites: int) -> str:
    """Torch threads for each simulated site: its share of the cores, at least one."""
    return str(max(1, (os.cpu_count() or 1) // num_sites))


def run(run_dir: Path) -> None:
    """Run the federation described by ``run_dir/config.toml``."""
    from flwr.simulation import run_simulation  # imported here: it pulls in Ray

    settings = RunSettings.from_run_config(tomllib.loads((run_dir / "config.toml").read_text()))
    sites = site_folders(settings.sites_dir)
    settings = settings.replace(run_dir=str(run_dir), num_sites=len(sites))
    # Ray's workers inherit this process's environment; Ray itself only sets the thread count where it is unset.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads_per_site(len(sites))
    run_simulation(
        server_app=build_server_app(settings),
        client_app=build_client_app(sites),
        num_supernodes=len(sites),
        backend_config=backend_config(settings, len(sites)),
    )


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines; do not log them twice
    logging.getLogger("alembic").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    run(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
