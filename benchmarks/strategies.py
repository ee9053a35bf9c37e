"""Which federated option serves each scanner best: FedAvg, FedProx, FedAdam, a personal reconstruction head and
scanner-aware conditioning, against local-only and pooled training, on the phantom suite with leave-one-out.

Writes the phantom sites once; every option trains on a fresh copy of them (a site keeps its personal head and
ledger in its folder) with the same settings and seed, as ``fedsr simulate --leave-one-out``:

- ``fedavg`` (``--strategy fedavg``, with ``--baselines local,pooled``: the local-only and pooled models come from
  this run), ``fedprox``, ``fedadam``, ``personal=head`` and ``condition=acquisition`` (FedAvg with those options);
- per option, from each run's ``cross_site.json`` (mean test PSNR over a site's test scans): at every site the model
  trained with it (``global``), and on each held-out scanner the model trained without that site
  (``holdout:SITE`` at SITE); local-only: each site's own model at home, and on a held-out scanner the mean of the
  other sites' local models there; pooled: the pooled model (it has seen every site: no held-out figure).

The site with the largest shift is the one where FedAvg loses most when that scanner is unseen (its ``global``
PSNR there minus its ``holdout:SITE`` PSNR). Target: at that site, the best of fedprox, fedadam, personal=head and
condition=acquisition beats FedAvg (its ``global`` PSNR there; the held-out figure is shown beside it). Writes
``benchmarks/results/strategies.json``.

    python benchmarks/strategies.py [--options fedavg fedprox ...] [--out DIR] [fedsr simulate flags ...]

Extra flags go to every run (e.g. ``--rounds 2 --local-steps 5`` for a quick look). The full run: five
leave-one-out runs of the default settings on 3 sites (each 4 federations; about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench_common import markdown_table, run_simulate, write_results
from simulation.phantoms import write_phantom_sites

#: Each option's flags; ``fedavg`` also trains the reference models.
OPTIONS: dict[str, list[str]] = {
    "fedavg": ["--strategy", "fedavg", "--baselines", "local,pooled"],
    "fedprox": ["--strategy", "fedprox"],
    "fedadam": ["--strategy", "fedadam"],
    "personal=head": ["--personal", "head"],
    "condition=acquisition": ["--condition", "acquisition"],
}
#: The options the target compares with FedAvg.
CHALLENGERS = ("fedprox", "fedadam", "personal=head", "condition=acquisition")


def option_run(out: Path, option: str, sites: Path, extra: list[str]) -> dict[str, dict[str, float]]:
    """One leave-one-out run of ``option`` on a fresh copy of ``sites`` (kept in ``out``; a finished run of an
    earlier call is reused). Returns ``{model: {site: mean test PSNR}}`` from its ``cross_site.json``."""
    folder = out / option.replace("=", "-")
    run_dir = folder / "run"
    if not (run_dir / "cross_site.json").exists():
        shutil.rmtree(folder / "sites", ignore_errors=True)
        shutil.copytree(sites, folder / "sites")
        argv = ["--sites-dir", str(folder / "sites"), "--leave-one-out", "--baselines", "none", *OPTIONS[option]]
        seconds = run_simulate(run_dir, [*argv, *extra])  # the option's --baselines comes last and wins
        print(f"  {option}: {seconds:.0f} s", flush=True)
    scores = json.loads((run_dir / "cross_site.json").read_text())["scores"]
    return {model: {site: float(np.mean(metrics["psnr"])) for site, metrics in cells.items()}
            for model, cells in scores.items()}


def table(runs: dict[str, dict[str, dict[str, float]]], sites: list[str]) -> dict[str, dict[str, dict]]:
    """``{option: {site: {"site": PSNR of the model trained with the site, "held_out": PSNR of the one trained
    without it (None where there is none)}}}``, local-only and pooled included (from the fedavg run)."""
    rows = {option: {site: {"site": psnr["global"].get(site), "held_out": psnr.get(f"holdout:{site}", {}).get(site)}
                     for site in sites} for option, psnr in runs.items()}
    if "fedavg" in runs:
        psnr = runs["fedavg"]
        rows["local-only"] = {site: {
            "site": psnr.get(f"local:{site}", {}).get(site),
            "held_out": _mean([cells[site] for model, cells in psnr.items()
                               if model.startswith("local:") and model != f"local:{site}" and site in cells]),
        } for site in sites}
        rows["pooled"] = {site: {"site": psnr.get("pooled", {}).get(site), "held_out": None} for site in sites}
    return rows


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def verdict(rows: dict[str, dict[str, dict]], sites: list[str]) -> dict | None:
    """The site of the largest shift (FedAvg's seen minus held-out PSNR) and whether the best challenger beats FedAvg
    there; None without the fedavg run or a challenger."""
    challengers = [option for option in CHALLENGERS if option in rows]
    if "fedavg" not in rows or not challengers:
        return None
    fedavg = rows["fedavg"]
    shifted = max(sites, key=lambda site: fedavg[site]["site"] - fedavg[site]["held_out"])
    best = max(challengers, key=lambda option: rows[option][shifted]["site"])
    unseen = [option for option in challengers if rows[option][shifted]["held_out"] is not None]
    best_unseen = max(unseen, key=lambda option: rows[option][shifted]["held_out"]) if unseen else None
    return {
        "site": shifted, "shift_db": fedavg[shifted]["site"] - fedavg[shifted]["held_out"],
        "best": best, "gain_db": rows[best][shifted]["site"] - fedavg[shifted]["site"],
        "best_held_out": best_unseen,
        "held_out_gain_db": (rows[best_unseen][shifted]["held_out"] - fedavg[shifted]["held_out"]
                             if best_unseen else None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (a finished run is reused)")
    args, extra = parser.parse_known_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsr-strategies-"))
    sites_dir = out / "sites"
    if not sites_dir.exists():
        write_phantom_sites(sites_dir, n_sites=args.sites)
    runs = {option: option_run(out, option, sites_dir, extra) for option in args.options}
    sites = sorted(next(iter(runs.values()))["global"])
    rows = table(runs, sites)
    found = verdict(rows, sites)
    print(f"\nmean test PSNR (dB), phantom suite of {len(sites)} sites; extra flags: {' '.join(extra) or '-'}")
    header = ["option", *(name for site in sites for name in (site, f"{site} held out"))]
    print(markdown_table(header, [[option, *(rows[option][site][column] for site in sites
                                             for column in ("site", "held_out"))] for option in rows]))
    if found:
        print(f"largest shift: {found['site']} (FedAvg {found['shift_db']:.2f} dB lower when it is unseen); best "
              f"option there: {found['best']} ({found['gain_db']:+.2f} dB vs FedAvg: target "
              f"{'met' if found['gain_db'] > 0 else 'NOT met'}); held out: {found['best_held_out']} "
              + (f"({found['held_out_gain_db']:+.2f} dB vs FedAvg)" if found["held_out_gain_db"] is not None else ""))
    path = write_results("strategies", {"flags": extra, "sites": sites, "options": OPTIONS, "psnr": rows,
                                        "largest_shift": found})
    print(f"figures: {path}; runs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
