"""Training throughput inside the ClientApp vs the same model in a plain PyTorch loop, for every family.

Inside: one Flower simulation (one SuperNode, one CPU thread as a simulated client gets) runs one training round
per family; each reply reports the patches it trained on and the seconds its loop took. Plain: in this process,
on one thread, the same sampler feeds a hand-written loop (forward, L1, backward, Adam step) for the same number
of steps. A family whose task has an optimisation loop of its own (the GAN's has two networks) is measured by
calling its local task directly, without Flower.

    python benchmarks/throughput.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from bench_common import round_job
from client.app import build_client_app
from client.tasks import task_for
from client.tasks.supervised import SupervisedTask
from server.app import run_federation
from server.settings import RunSettings
from shared_models.registry import build_from_settings
from simulation.phantoms import write_phantom_sites

#: Run-config overrides per measured run (the run's name is its model family unless ``model`` says otherwise).
RUNS = {
    "srcnn": {}, "edsr": {}, "edsr-3d": {"model": "edsr", "spatial-dims": 3, "patch-size": 32},
    "swinir": {}, "gan": {"gan.warmup-rounds": 0}, "smore": {},
}


def settings_for(name: str, base: RunSettings) -> RunSettings:
    return RunSettings.from_run_config({**base.to_config(), "model": name, **RUNS[name]})


def inside_flower(base: RunSettings, site: Path, root: Path) -> dict[str, float]:
    """patches/s reported by the ClientApp, per run, from one simulation."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for name in RUNS:
            run_federation(grid, settings_for(name, base).replace(run_dir=str(root / name)))

    run_simulation(server_app=server, client_app=build_client_app([str(site)]), num_supernodes=1,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    out = {}
    for name in RUNS:
        rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["phase"] == "train"]
        out[name] = sum(r["train-patches"] for r in train) / sum(r["train-seconds"] for r in train)
    return out


def plain_loop(name: str, base: RunSettings, site_dir: Path) -> float:
    """patches/s of the same model and data in a hand-written loop on one thread."""
    settings = settings_for(name, base)
    model = build_from_settings(settings)
    job = round_job(settings, 1)
    task = task_for(settings.model)
    site = task.prepare(str(site_dir), job)
    if type(task).fit is not SupervisedTask.fit:  # a loop of the family's own: time the task itself
        metrics = task.train(model, model.state_dict(), site, job).metrics
        return metrics["train-patches"] / metrics["train-seconds"]
    sampler = site.pairing.sampler(site.train, site.scale, settings.patch_size, np.random.default_rng(0))
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    model.train()
    start = time.perf_counter()
    for _ in range(settings.local_steps):
        lr, hr = sampler.batch(settings.batch_size)
        optimiser.zero_grad()
        torch.nn.functional.l1_loss(model(lr), hr).backward()
        optimiser.step()
    return settings.local_steps * settings.batch_size / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=RunSettings().local_steps)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedsr-throughput-"))
    (site,) = write_phantom_sites(root / "sites", n_sites=1)
    base = RunSettings(num_rounds=1, num_sites=1, min_sites=1, local_steps=args.steps, evaluate_round_zero=False,
                       eval_max_slices=4, sites_dir=str(root / "sites"))
    inside = inside_flower(base, site, root)
    torch.set_num_threads(1)
    print(f"training throughput, 1 CPU thread, {args.steps} steps, batch {base.batch_size}, tiny presets")
    for name in RUNS:
        plain = plain_loop(name, base, site)
        print(f"  {name:<8} plain {plain:7.1f} patches/s   in ClientApp {inside[name]:7.1f} patches/s   "
              f"ratio {inside[name] / plain:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
