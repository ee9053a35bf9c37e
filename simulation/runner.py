"""Runs one federation on Flower's simulation engine: the ClientApp and ServerApp composed, nothing added.

Started by ``fedsr simulate`` as ``python -m simulation.runner RUN_CONFIG_JSON [INJECTIONS_JSON]`` in a process of
its own, so that Flower's and Ray's output goes to ``RUN_DIR/flower.log`` and Ctrl-C can stop the whole federation at
once. The first argument is the flat run config (``RunSettings.to_config()``) as JSON; each sub-folder of
``sites-dir`` is one simulated site. The ServerApp writes ``RUN_DIR/config.toml``, as under ``flwr run``. The
second, optional, is a JSON list of ``--inject`` specs (``simulation.inject``): faults the ClientApp's
:class:`~simulation.inject.InjectionMod` injects at the sites they name. They are kept apart from the run config
on purpose: a fault is no run setting and must never reach a real deployment.

Start-up is most of a short run's cost (Ray's processes, and every process importing torch, MONAI and Flower), so
this module imports nothing heavy at the top: :func:`main` starts Ray first, with its workers preloading the site's
code, while this process imports the apps in a second thread; Flower's engine then uses the running Ray as it is.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from client.data.files import site_folders

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod

    from server.settings import RunSettings

#: What every Ray worker imports as it starts, before it is given a site: the ClientApp, the site's data and
#: training stack (imported by the app only at its first message), MONAI (which the networks and metrics use) and
#: torch._dynamo (which torch's optimisers import when the first one is built: about a second, once per process).
WORKER_PRELOAD = "client.app,client.paired,monai,torch._dynamo"

log = logging.getLogger(__name__)


def site_processes(num_sites: int) -> int:
    """How many worker processes (Ray actors) serve the sites: one per site while every process gets at least two
    cores, fewer otherwise (at least one), so that a small machine does not pay every process's start-up (torch,
    MONAI and Flower imports: seconds of CPU each) for parallelism it does not have. A process serves its sites in
    turn with all of its threads, and keeps each site's prepared data."""
    return max(1, min(num_sites, (os.cpu_count() or 1) // 2))


def threads_per_process(num_sites: int) -> str:
    """Torch threads for each worker process: its share of the cores, at least one."""
    return str(max(1, (os.cpu_count() or 1) // site_processes(num_sites)))


def start_ray(num_sites: int, device: str) -> None:
    """Start Ray for ``num_sites`` sites: all cores, the GPU Ray finds unless ``device`` is ``cpu``.

    Its workers inherit this process's environment: the import path (so they find the project as this process
    does), each worker's share of threads, and the modules to preload (Ray's ``preload_python_modules``).
    """
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [*sys.path, os.environ.get("PYTHONPATH")]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads_per_process(num_sites)
    os.environ["RAY_preload_python_modules"] = WORKER_PRELOAD
    # One logical CPU per worker process (each uses its threads' worth of cores): Ray then starts exactly the
    # workers the sites need, each preloading, and no spare one competes with them for the cores.
    ray.init(
        num_cpus=site_processes(num_sites), num_gpus=0 if device == "cpu" else None, include_dashboard=False,
        log_to_driver=True,
    )


def client_resources(settings: RunSettings, num_sites: int) -> dict:
    """Ray resources of each worker process (Flower starts as many actors as these fit in Ray's resources): one of
    the :func:`site_processes` logical CPUs :func:`start_ray` declares, and an equal share of the GPU, if used."""
    import torch

    processes = site_processes(num_sites)
    uses_gpu = settings.device != "cpu" and torch.cuda.is_available()
    return {"num_cpus": 1, "num_gpus": 1.0 / min(processes, 4) if uses_gpu else 0.0}


def _import_apps() -> tuple:
    """torch, MONAI and Flower: seconds of CPU that Ray's start-up can overlap; the model families too, which the
    ServerApp needs first thing."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app
    from server.settings import RunSettings
    from shared_models.registry import families

    families()
    return run_simulation, build_client_app, build_server_app, RunSettings


def run(run_config: dict, injections: Sequence[str] = (), mods: Sequence[Mod] = ()) -> None:
    """Run the federation the flat ``run_config`` describes (``sites-dir`` and ``run-dir`` set), with the faults
    ``injections`` (``--inject`` specs) injected at their sites; each is logged at WARNING first. ``mods``: more
    ClientApp mods around the injection (a benchmark's measuring mod: it sees what leaves the site)."""
    sites = site_folders(str(run_config["sites-dir"]))
    mods = [*mods, *injection_mods(injections, sites)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-apps") as pool:
        imports = pool.submit(_import_apps)
        start_ray(len(sites), str(run_config.get("device", "auto")))
        run_simulation, build_client_app, build_server_app, settings_type = imports.result()
    settings = settings_type.from_run_config(run_config).replace(num_sites=len(sites))
    run_simulation(
        server_app=build_server_app(settings),
        client_app=build_client_app(sites, mods=mods),
        num_supernodes=len(sites),
        backend_config={"client_resources": client_resources(settings, len(sites))},
    )


def injection_mods(injections: Sequence[str], sites: Sequence[str]) -> list[Mod]:
    """The ClientApp mods that inject the faults ``injections`` (``--inject`` specs) at the simulated ``sites``
    (folders by partition id), each fault logged at WARNING; none without faults (``simulation.inject``, which
    imports Flower, is then not imported before Ray starts).

    Raises:
        ValueError: a bad spec, or a site that is not among ``sites`` (``simulation.inject.assign``).
    """
    if not injections:
        return []
    from simulation.inject import InjectionMod, assign, parse_injection

    faults = assign([parse_injection(spec) for spec in injections], sites)
    for fault in (fault for site_faults in faults.values() for fault in site_faults):
        log.warning("fault injected at site %s (%s): %s", fault.site, fault.spec, fault.effect)
    return [InjectionMod(faults)]


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines; do not log them twice
    logging.getLogger("alembic").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    run(json.loads(args[0]), json.loads(args[1]) if len(args) > 1 else ())
    return 0


if __name__ == "__main__":
    sys.exit(main())
