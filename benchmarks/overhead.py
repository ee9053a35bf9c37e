"""Framework overhead: the same federated training done by a plain PyTorch loop and by fedsr through Flower.

Both sides run the default settings on the same phantom sites: ``num-rounds`` rounds in which every site
trains ``local-steps`` steps from the global weights, the weights are averaged, and every site is evaluated
(round 0 included). The plain loop does this sequentially in one process with every core; the federation
runs through Flower's simulation engine (Ray actors), end to end, start-up included.

Prints wall times, the ratio federation / plain loop, and the client's training throughput (patches/s)
inside the ClientApp against the plain loop's.

    python -m benchmarks.overhead [--sites 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from client.pairs import prepare_site
from client.tasks.supervised import SupervisedTask
from client.tasks.base import RoundJob
from server.app import model_from_settings, round_config
from server.run_log import atomic_write_text, toml_dumps
from server.settings import RunSettings
from shared_models.registry import build_model, model_spec
from simulation.phantoms import write_phantom_sites
from simulation.runner import run as run_federation
from simulation.runner import site_folders


def round_job(settings: RunSettings, server_round: int) -> RoundJob:
    """The instructions a client gets in a round: the coordinator's ConfigRecord, read as the ClientApp reads it."""
    spec = model_spec(model_from_settings(settings))
    config = round_config(settings, spec["name"], spec["params"])
    config["server-round"] = server_round
    return RoundJob.from_config(config, torch.device("cpu"))


def plain_loop(settings: RunSettings, folders: list[str]) -> dict[str, float]:
    """FedAvg by hand: no Flower, no Ray, no messages. Returns wall seconds and training patches/s."""
    start = time.perf_counter()
    task = SupervisedTask()
    model = build_model(settings.model, preset=settings.model_preset, scale=settings.scale)
    train_seconds = patches = 0.0
    psnr = {}

    def job(server_round: int) -> RoundJob:
        return round_job(settings, server_round)

    sites = [task.prepare(folder, job(0)) for folder in folders]
    for site in sites:
        task.evaluate(model, site, job(0))
    for server_round in range(1, settings.num_rounds + 1):
        states, weights = [], []
        for site in sites:
            local = copy.deepcopy(model)
            result = task.train(local, site, job(server_round), None)
            states.append(result.weights)
            weights.append(result.metrics["num-examples"])
            train_seconds += result.metrics["train-seconds"]
            patches += result.metrics["train-patches"]
        total = float(sum(weights))
        model.load_state_dict({k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in states[0]})
        psnr = {site.name: task.evaluate(model, site, job(server_round))["psnr"] for site in sites}
    return {"seconds": time.perf_counter() - start, "patches_per_s": patches / train_seconds, "psnr": psnr}


def single_thread_throughput(settings: RunSettings, folder: str) -> float:
    """Training patches/s of one site's local steps in a plain loop on one thread (what a client gets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = SupervisedTask()
        job = round_job(settings, 1)
        model = build_model(settings.model, preset=settings.model_preset, scale=settings.scale)
        metrics = task.train(model, task.prepare(folder, job), job, None).metrics
        return metrics["train-patches"] / metrics["train-seconds"]
    finally:
        torch.set_num_threads(threads)


def federation(settings: RunSettings, run_dir: Path) -> dict[str, float]:
    """The same work through Flower's simulation engine, in this process (Ray start-up included)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", toml_dumps(settings.replace(run_dir=str(run_dir)).to_run_config()))
    start = time.perf_counter()
    run_federation(run_dir)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "seconds": seconds,
        "patches_per_s": sum(r["train-patches"] for r in train) / sum(r["train-seconds"] for r in train),
        "psnr": {site: m["psnr"] for site, m in summary["sites"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=RunSettings().num_sites)
    parser.add_argument("--out", type=Path, default=None, help="Keep the run here (default: a temp folder).")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="fedsr-overhead-"))
    folders = [str(p) for p in write_phantom_sites(root / "sites", n_sites=args.sites)]
    settings = RunSettings(num_sites=args.sites, sites_dir=str(root / "sites"))
    assert site_folders(settings.sites_dir) == folders
    fed = federation(settings, root / "run")
    prepare_site.cache_clear()
    plain = plain_loop(settings, folders)
    one_thread = single_thread_throughput(settings, folders[0])
    print(f"sites {args.sites}, rounds {settings.num_rounds}, local steps {settings.local_steps}, "
          f"batch {settings.batch_size}, HR patch {settings.patch_size}, model {settings.model}-{settings.model_preset}")
    print(f"plain PyTorch loop ({torch.get_num_threads()} threads): {plain['seconds']:7.1f} s   train {plain['patches_per_s']:7.1f} patches/s")
    print(f"Flower simulation       : {fed['seconds']:7.1f} s   train {fed['patches_per_s']:7.1f} patches/s (per client)")
    print(f"wall ratio federation / plain      : {fed['seconds'] / plain['seconds']:.2f}")
    print(f"plain loop, 1 thread (a client's share): train {one_thread:7.1f} patches/s")
    print(f"client throughput ratio fed / plain (1 thread each): {fed['patches_per_s'] / one_thread:.2f}")
    for site in sorted(fed["psnr"]):
        print(f"  {site}: PSNR federation {fed['psnr'][site]:.2f} dB, plain loop {plain['psnr'].get(site, float('nan')):.2f} dB")


if __name__ == "__main__":
    main()
