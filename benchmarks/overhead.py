"""Framework overhead: the same federated training done by a plain PyTorch loop and by fedsr through Flower.

Both sides run the default settings on the same phantom sites: ``num-rounds`` rounds in which every site
trains ``local-steps`` steps from the global weights, the weights are averaged, and every site is evaluated
(round 0 included). The plain loop does this sequentially in one process with every core; the federation
runs as ``fedsr simulate`` runs it (``python -m simulation.runner RUN_CONFIG_JSON`` in a process of its own, on Flower's
simulation engine with one Ray actor per site), end to end.

Prints, all from one run of each side:

- the fixed start-up: from the federation process's start to the round-0 evaluation rows in ``metrics.jsonl``
  (split at the ServerApp's start, when its RunRecorder is created), beside the plain loop's own start-up
  (site preparation + round-0 evaluation, the same work without the framework);
- the per-round ratio: the federation's mean round time (between the last evaluation rows of consecutive rounds)
  over the plain loop's mean round time (train every site, average, evaluate every site);
- the end-to-end ratio, and the client's training throughput (patches/s) inside the ClientApp against the
  plain loop's.

    python benchmarks/overhead.py [--sites 3] [--out DIR] [--rounds N] [--local-steps N]

``--rounds`` and ``--local-steps`` (default: the run defaults) make a short run for a quick look at the start-up;
the README's figures use the defaults.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_common import round_job
from client.data.files import site_folders
from client.pairs import PREPARED_SITES
from client.tasks import task_for
from server.settings import RunSettings
from shared_models.registry import build_from_settings
from simulation.phantoms import write_phantom_sites

START_UP_TARGET_S = 8.0
ROUND_RATIO_TARGET = 1.05


def plain_loop(settings: RunSettings, folders: list[str]) -> dict:
    """FedAvg by hand: no Flower, no Ray, no messages. Returns wall seconds (total, start-up, each round),
    training patches/s and the final PSNR per site."""
    start = time.perf_counter()
    task = task_for(settings.model)
    model = build_from_settings(settings)
    train_seconds = patches = 0.0
    psnr = {}

    def job(server_round: int):
        return round_job(settings, server_round)

    sites = [task.prepare(folder, job(0)) for folder in folders]
    for site in sites:
        task.evaluate(model, model.state_dict(), site, job(0))
    start_up = time.perf_counter() - start
    rounds = []
    for server_round in range(1, settings.num_rounds + 1):
        round_start = time.perf_counter()
        states, weights = [], []
        global_weights = copy.deepcopy(model.state_dict())
        for site in sites:
            result = task.train(copy.deepcopy(model), global_weights, site, job(server_round))
            states.append(result.weights)
            weights.append(result.metrics["num-examples"])
            train_seconds += result.metrics["train-seconds"]
            patches += result.metrics["train-patches"]
        total = float(sum(weights))
        model.load_state_dict({k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in states[0]})
        psnr = {site.name: task.evaluate(model, model.state_dict(), site, job(server_round))["psnr"] for site in sites}
        rounds.append(time.perf_counter() - round_start)
    return {"seconds": time.perf_counter() - start, "start_up": start_up, "rounds": rounds,
            "patches_per_s": patches / train_seconds, "psnr": psnr}


def single_thread_throughput(settings: RunSettings, folder: str) -> float:
    """Training patches/s of one site's local steps in a plain loop on one thread (what a client gets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = task_for(settings.model)
        job = round_job(settings, 1)
        model = build_from_settings(settings)
        metrics = task.train(model, model.state_dict(), task.prepare(folder, job), job).metrics
        return metrics["train-patches"] / metrics["train-seconds"]
    finally:
        torch.set_num_threads(threads)


def federation(settings: RunSettings, run_dir: Path) -> dict:
    """The same work as ``fedsr simulate`` runs it: ``python -m simulation.runner RUN_CONFIG_JSON`` in its own process.

    Times come from one clock (``time.time``): the process start here, the ServerApp's start (its RunRecorder's
    creation: ``summary.json``'s write time less its ``wall_seconds``) and the ``time`` of each metrics row
    (seconds since that RunRecorder's creation).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = json.dumps(settings.replace(run_dir=str(run_dir)).to_config())
    log = run_dir.parent / f"{run_dir.name}-runner.log"
    with log.open("w") as out:
        launched = time.time()
        proc = subprocess.run([sys.executable, "-m", "simulation.runner", run_config], stdout=out,
                              stderr=subprocess.STDOUT)
        seconds = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"federation failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return read_run(run_dir, launched, seconds, settings.num_rounds)


def read_run(run_dir: Path, launched: float, seconds: float, num_rounds: int) -> dict:
    """Start-up, round times, throughput and final PSNR of a finished run whose process started at ``launched``
    (``time.time()``) and ran ``seconds``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    server_start = summary_path.stat().st_mtime - summary["wall_seconds"] - launched
    evaluated = {}  # round -> time (since the ServerApp's start) of its last evaluation row
    for row in rows:
        if row["phase"] == "evaluate":
            evaluated[row["round"]] = max(evaluated.get(row["round"], 0.0), row["time"])
    if 0 not in evaluated:
        raise RuntimeError("no round-0 evaluation in metrics.jsonl: the start-up is measured to the round-0 scores")
    train = [r for r in rows if r["phase"] == "train"]
    return {
        "seconds": seconds,
        "server_start": server_start,
        "start_up": server_start + evaluated[0],
        "rounds": [evaluated[r] - evaluated[r - 1] for r in range(1, num_rounds + 1)],
        "after_last_round": seconds - server_start - evaluated[num_rounds],
        "patches_per_s": sum(r["train-patches"] for r in train) / sum(r["train-seconds"] for r in train),
        "psnr": {site: m["psnr"] for site, m in summary["sites"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=RunSettings().num_sites)
    parser.add_argument("--out", type=Path, default=None, help="Keep the run here (default: a temp folder).")
    parser.add_argument("--rounds", type=int, default=RunSettings().num_rounds)
    parser.add_argument("--local-steps", type=int, default=RunSettings().local_steps)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="fedsr-overhead-"))
    folders = [str(p) for p in write_phantom_sites(root / "sites", n_sites=args.sites)]
    settings = RunSettings(num_sites=args.sites, sites_dir=str(root / "sites"), num_rounds=args.rounds,
                           local_steps=args.local_steps)
    assert site_folders(settings.sites_dir) == folders
    fed = federation(settings, root / "run")
    PREPARED_SITES.clear()
    plain = plain_loop(settings, folders)
    one_thread = single_thread_throughput(settings, folders[0])
    fed_round, plain_round = statistics.mean(fed["rounds"]), statistics.mean(plain["rounds"])
    print(f"sites {args.sites}, rounds {settings.num_rounds}, local steps {settings.local_steps}, "
          f"batch {settings.batch_size}, HR patch {settings.patch_size}, model {settings.model}-{settings.model_preset}")
    print(f"plain PyTorch loop ({torch.get_num_threads()} threads): {plain['seconds']:7.1f} s   "
          f"train {plain['patches_per_s']:7.1f} patches/s")
    print(f"Flower simulation (own process): {fed['seconds']:7.1f} s   "
          f"train {fed['patches_per_s']:7.1f} patches/s (per client)")
    print(f"fixed start-up to round-0 scores : federation {fed['start_up']:6.1f} s "
          f"(process start -> ServerApp {fed['server_start']:.1f} s, ServerApp -> round-0 scores "
          f"{fed['start_up'] - fed['server_start']:.1f} s); plain loop {plain['start_up']:.1f} s "
          f"(site preparation + round-0 evaluation)   target < {START_UP_TARGET_S:g} s")
    print(f"per round (mean of {settings.num_rounds})        : federation {fed_round:6.2f} s, plain loop "
          f"{plain_round:.2f} s, ratio {fed_round / plain_round:.3f}   target <= {ROUND_RATIO_TARGET:g}")
    print(f"  federation rounds: {' '.join(f'{s:.2f}' for s in fed['rounds'])} s; "
          f"plain rounds: {' '.join(f'{s:.2f}' for s in plain['rounds'])} s; "
          f"federation after last round (final checkpoint, shutdown) {fed['after_last_round']:.1f} s")
    print(f"wall ratio federation / plain      : {fed['seconds'] / plain['seconds']:.2f}")
    print(f"plain loop, 1 thread (a client's share): train {one_thread:7.1f} patches/s")
    print(f"client throughput ratio fed / plain (1 thread each): {fed['patches_per_s'] / one_thread:.2f}")
    for site in sorted(fed["psnr"]):
        print(f"  {site}: PSNR federation {fed['psnr'][site]:.2f} dB, plain loop "
              f"{plain['psnr'].get(site, float('nan')):.2f} dB")


if __name__ == "__main__":
    main()
