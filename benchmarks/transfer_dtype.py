"""float16 transfer (``--transfer-dtype float16``) against float32: bytes per round and the final PSNR.

The same federation (default settings, 3 phantom sites, ``--baselines none``; the same sites and seed) runs twice,
once per transfer dtype, each as ``fedsr simulate`` runs it (``simulation.runner.run`` in a process of its own)
with one more ClientApp mod, :class:`ByteCounter`: at every site it counts each message that arrives and each
reply that leaves with Flower's own ``count_bytes()`` of their records (what Flower's ``message_size_mod`` logs),
and appends one line per message to ``bytes.jsonl`` in the run folder. (``messages.jsonl``, the coordinator's
record of what it sent, holds no sizes; counting at the sites covers both directions.)

Per run: the bytes of a federated round (train and evaluate, both directions, every site; in all, and of the
weights alone: the round config and the metrics do not shrink), and the final global model's test PSNR at every
site (``cross_site.json``). Targets: float16 halves the weights' bytes per round (ratio <= 0.51: each array also
carries a header of fixed size) and changes the PSNR by less than 0.05 dB at every site; the ratio in all is shown
beside. Writes ``benchmarks/results/transfer_dtype.json``.

With ``--seeds`` the pair of runs is repeated for each seed (run-config ``seed``: initial weights, patch sampling):
the PSNR change is then the mean over the seeds of each seed's float16 - float32 difference, shown beside the spread
of float32 itself from seed to seed (the largest - smallest PSNR at each site), the scale of change that any
perturbation of training, float16 or another seed, makes on these short runs.

    python benchmarks/transfer_dtype.py [--seeds 0 1 2] [--run-config "num-rounds=2 local-steps=5"] [--out DIR]

The full run: two default federations per seed (about 3 minutes a seed on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from bench_common import markdown_table, write_results
from simulation.phantoms import write_phantom_sites

DTYPES = ("float32", "float16")
PSNR_TARGET_DB = 0.05
#: float16 / float32 bytes of the weights per round, at most: half, plus 1 % for the header every array carries
#: whatever its dtype (about 140 bytes: 0.504 for the default EDSR tiny, 0.507 for SRCNN tiny).
BYTES_TARGET = 0.51


class ByteCounter:
    """Flower client mod: appends ``{"type", "round", "in", "out", "in_weights", "out_weights"}`` (bytes,
    ``count_bytes()`` summed over every record, and over the ArrayRecords alone) of every message and its reply to
    ``path`` (one short line per write: appends from the simulation's worker processes do not interleave)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        config = msg.content.config_records.get("config")
        row = {"type": msg.metadata.message_type, "round": config.get("server-round") if config else None,
               "in": _bytes(msg), "out": _bytes(reply), "in_weights": _bytes(msg, True),
               "out_weights": _bytes(reply, True)}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        return reply


def _bytes(msg: Message, weights_only: bool = False) -> int:
    """Flower's size of the message's records (of its ArrayRecords alone with ``weights_only``)."""
    if not msg.has_content():
        return 0
    records = msg.content.array_records if weights_only else msg.content
    return sum(record.count_bytes() for record in records.values())


def one_run(run_dir: Path, sites: Path, dtype: str, run_config: str) -> None:
    """This process runs one federation (``--one``), as ``fedsr simulate`` would, counting bytes at the sites."""
    from simulation.cli import settings_from_command_line
    from simulation.runner import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    settings = settings_from_command_line({}, run_config).replace(
        run_dir=str(run_dir), sites_dir=str(sites), transfer_dtype=dtype, baselines="none")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bytes.jsonl").unlink(missing_ok=True)
    run(settings.to_config(), mods=[ByteCounter(run_dir / "bytes.jsonl")])


def figures(run_dir: Path) -> dict:
    """Bytes per federated round (both directions, every site; all of them and the weights' alone) and the final
    test PSNR per site of one run."""
    rows = [json.loads(line) for line in (run_dir / "bytes.jsonl").read_text().splitlines()]
    rounds = [row for row in rows if row["type"] in ("train", "evaluate") and (row["round"] or 0) >= 1]
    count = len({row["round"] for row in rounds})
    scores = json.loads((run_dir / "cross_site.json").read_text())["scores"]["global"]
    return {"rounds": count, "bytes_per_round": sum(row["in"] + row["out"] for row in rounds) / count,
            "weight_bytes_per_round": sum(row["in_weights"] + row["out_weights"] for row in rounds) / count,
            "psnr": {site: float(np.mean(metrics["psnr"])) for site, metrics in scores.items()}}


def finished_run(folder: Path, sites: Path, dtype: str, seed: int, run_config: str) -> Path:
    """The run folder of one federation (``folder/run``), run in a process of its own unless an earlier call with
    the same ``--out`` finished it."""
    run_dir = folder / "run"
    if not (run_dir / "cross_site.json").exists():
        log_path = folder / "run.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log_file:
            done = subprocess.run([sys.executable, __file__, "--one", dtype, str(run_dir), str(sites),
                                   "--run-config", f"{run_config} seed={seed}".strip()], stdout=log_file,
                                  stderr=subprocess.STDOUT,
                                  env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_DEDUP_LOGS="0"))
        if done.returncode != 0:
            raise SystemExit(f"the {dtype} run failed; see {log_path}:\n" + log_path.read_text()[-3000:])
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="", help="run-config keys for both runs, as fedsr simulate takes them")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed")
    parser.add_argument("--one", nargs=3, metavar=("DTYPE", "RUN_DIR", "SITES_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_run(Path(args.one[1]).resolve(), Path(args.one[2]).resolve(), args.one[0], args.run_config)
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsr-transfer-dtype-"))
    sites = out / "sites"
    if not sites.exists():
        write_phantom_sites(sites, n_sites=3)
    runs = {seed: {dtype: figures(finished_run(out / f"seed-{seed}" / dtype, sites, dtype, seed, args.run_config))
                   for dtype in DTYPES} for seed in args.seeds}
    first = runs[args.seeds[0]]
    ratio = first["float16"]["bytes_per_round"] / first["float32"]["bytes_per_round"]
    weights = first["float16"]["weight_bytes_per_round"] / first["float32"]["weight_bytes_per_round"]
    sites_scored = sorted(first["float32"]["psnr"])
    per_seed = {seed: {site: pair["float16"]["psnr"][site] - pair["float32"]["psnr"][site] for site in sites_scored}
                for seed, pair in runs.items()}
    change = {site: float(np.mean([per_seed[seed][site] for seed in args.seeds])) for site in sites_scored}
    spread = {site: float(np.ptp([runs[seed]["float32"]["psnr"][site] for seed in args.seeds]))
              for site in sites_scored}
    print(f"\n3 phantom sites; run config: {args.run_config or '(defaults)'}; seeds {args.seeds}")
    print(markdown_table(
        ["seed", "transfer dtype", "kB per round", "of which weights",
         *(f"{site} PSNR dB" for site in sites_scored)],
        [[str(seed), dtype, f"{pair[dtype]['bytes_per_round'] / 1e3:.1f}",
          f"{pair[dtype]['weight_bytes_per_round'] / 1e3:.1f}",
          *(f"{pair[dtype]['psnr'][s]:.3f}" for s in sites_scored)]
         for seed, pair in runs.items() for dtype in DTYPES],
    ))
    print(markdown_table(["site", "float16 - float32, mean over seeds (dB)", "float32 spread over seeds (dB)"],
                         [[site, f"{change[site]:+.3f}", f"{spread[site]:.3f}"] for site in sites_scored]))
    worst = max(abs(d) for d in change.values())
    print(f"float16 / float32 bytes per round: {ratio:.3f} in all, {weights:.3f} of the weights (target <= "
          f"{BYTES_TARGET}: half, plus the arrays' headers); largest PSNR change {worst:.4f} dB (target < "
          f"{PSNR_TARGET_DB}): " + ("targets met" if weights <= BYTES_TARGET and worst < PSNR_TARGET_DB
                                    else "targets NOT met"))
    path = write_results("transfer_dtype", {"run_config": args.run_config, "seeds": args.seeds, "runs": runs,
                                            "bytes_ratio": ratio, "weight_bytes_ratio": weights,
                                            "psnr_change_db": change, "psnr_change_by_seed_db": per_seed,
                                            "float32_spread_db": spread, "bytes_target": BYTES_TARGET,
                                            "psnr_target_db": PSNR_TARGET_DB})
    print(f"figures: {path}; runs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
