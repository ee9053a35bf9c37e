"""One poisoned site among four: what each ``fedsr simulate --inject`` fault does to the honest sites, with the
coordinator's reply validation on (the defaults) and switched off as far as the coordinator allows.

Writes 4 phantom sites once; every run trains on a fresh copy of them (a site keeps state in its folder) with the
same settings and seed. Runs: the clean federation, then for each fault (``nan``, ``scale:100``, ``random``,
``examples:1e12``, ``drop:2``) at the first site, once with the default validation and once with
``update-norm-limit=0 max-num-examples=10**18`` (the switches the coordinator offers). The structural checks
(records, keys, shapes, dtype, finite values) and the cap at each site's own reported training examples cannot be
switched off, so "off" shows the damage only of what those let through; a fault they still catch shows its rule in
the ``rejected`` column.

Per run, from ``cross_site.json`` and ``metrics.jsonl``: the final global model's test PSNR (mean over the site's
test scans) at every honest site, its difference from the clean run and from the federation the poisoned site
never joined (the best a rejection can give the honest sites: excluding a site also loses its honest data), and
the poisoned site's rejected replies by rule. Target: with validation on, every honest site within 0.2 dB of the
clean federation. Writes ``benchmarks/results/robustness.json``.

``--seeds 0 1 2``: the table above for the first seed; for each further seed (``--seed``: initial weights, patch
sampling) the clean federation, the one without the poisoned site and the first fault with validation on, so the
change that excluding the poisoned site brings the honest sites is shown as a mean over the seeds, beside the
clean federation's own spread from seed to seed.

    python benchmarks/robustness.py [--kinds nan scale:100 ...] [--seeds 0 1 2] [--out DIR] [fedsr simulate flags ...]

Extra flags go to every ``fedsr simulate`` (e.g. ``--rounds 2 --local-steps 5`` for a quick look); not
``--run-config``, which this script sets. The full run: 12 federations of the default settings, 6 more with
``--seeds 0 1 2`` (about 30 minutes on 2 quiet cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from bench_common import markdown_table, run_rows, run_simulate, write_results
from simulation.phantoms import write_phantom_sites

KINDS = ("nan", "scale:100", "random", "examples:1e12", "drop:2")
#: Validation off, as far as the coordinator allows it: no norm rule, no absolute example cap.
OFF = "update-norm-limit=0 max-num-examples=1000000000000000000"
TARGET_DB = 0.2


def federation(out: Path, name: str, sites: Path, argv: list[str]) -> dict:
    """One run on a fresh copy of ``sites`` (kept in ``out/name``; a finished run of an earlier call is reused).
    Returns its figures: ``psnr`` {site: the final global model's mean test PSNR}, ``rejected`` {site: {rule:
    count}}, ``missing`` (summary.json's missing_sites) and ``seconds``."""
    run_dir = out / name / "run"
    seconds = None
    if not (run_dir / "cross_site.json").exists():
        copy = out / name / "sites"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(sites, copy)
        seconds = run_simulate(run_dir, ["--sites-dir", str(copy), *argv])
    summary = json.loads((run_dir / "summary.json").read_text())
    rejected: dict[str, Counter] = {}
    for row in run_rows(run_dir):
        if row["phase"] == "rejected" and row["experiment"] == "global":
            rejected.setdefault(row["site"], Counter())[row["rule"]] += 1
    scores = json.loads((run_dir / "cross_site.json").read_text())["scores"]["global"]
    return {"psnr": {site: float(np.mean(metrics["psnr"])) for site, metrics in scores.items()},
            "rejected": {site: dict(rules) for site, rules in rejected.items()},
            "missing": summary.get("missing_sites", {}), "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), help="faults to inject (--inject KIND)")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the full table for the first; see above")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (a finished run is reused)")
    args, extra = parser.parse_known_args()
    if "--run-config" in extra:
        parser.error("--run-config is set by this script (validation off); give fedsr simulate flags only")
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsr-robustness-"))
    sites = out / "sites"
    if not sites.exists():
        write_phantom_sites(sites, n_sites=args.sites)
    poisoned = sorted(p.name for p in sites.iterdir() if p.is_dir())[0]
    argv = ["--baselines", "none", "--seed", str(args.seeds[0]), *extra]

    clean = federation(out, "clean", sites, argv)
    honest = sorted(site for site in clean["psnr"] if site != poisoned)
    # the best any validation can do for the honest sites: the federation the poisoned site never joined
    honest_sites = out / "sites-honest"
    if not honest_sites.exists():
        for site in honest:
            shutil.copytree(sites / site, honest_sites / site)
    without = federation(out, "without-poisoned-site", honest_sites, argv)
    runs = []
    for kind in args.kinds:
        for validation, more in (("on", []), ("off", ["--run-config", OFF])):
            name = f"{kind.replace(':', '-')}-{validation}"
            result = federation(out, name, sites, [*argv, "--inject", f"{poisoned}:{kind}", *more])
            delta = {site: result["psnr"].get(site, float("nan")) - clean["psnr"][site] for site in honest}
            worst = max(abs(d) for d in delta.values())
            vs_without = max(abs(result["psnr"].get(site, float("nan")) - without["psnr"][site]) for site in honest)
            runs.append({"fault": kind, "validation": validation, **result, "delta": delta, "worst_db": worst,
                         "within_target": worst <= TARGET_DB, "worst_vs_without_db": vs_without})
            print(f"  {name}: worst honest-site change {worst:.3f} dB", flush=True)

    by_seed = {args.seeds[0]: {"clean": clean["psnr"], "without": without["psnr"],
                               "fault_on": next(r["psnr"] for r in runs if r["validation"] == "on")}}
    for seed in args.seeds[1:]:
        seeded = ["--baselines", "none", "--seed", str(seed), *extra]
        by_seed[seed] = {
            "clean": federation(out, f"seed-{seed}-clean", sites, seeded)["psnr"],
            "without": federation(out, f"seed-{seed}-without-poisoned-site", honest_sites, seeded)["psnr"],
            "fault_on": federation(out, f"seed-{seed}-{args.kinds[0].replace(':', '-')}-on", sites,
                                   [*seeded, "--inject", f"{poisoned}:{args.kinds[0]}"])["psnr"],
        }
    seeds_summary = {site: {
        "fault_on_minus_clean_mean_db": float(np.mean([r["fault_on"][site] - r["clean"][site]
                                                       for r in by_seed.values()])),
        "fault_on_equals_without": all(r["fault_on"][site] == r["without"][site] for r in by_seed.values()),
        "clean_spread_db": float(np.ptp([r["clean"][site] for r in by_seed.values()])),
    } for site in honest}

    def rules(run: dict) -> str:
        return ", ".join(f"{rule} x{n}" for rule, n in run["rejected"].get(poisoned, {}).items()) or "-"

    print(f"\npoisoned site: {poisoned}; honest sites: {', '.join(honest)}; extra flags: {' '.join(extra) or '-'}")
    print("clean federation, final test PSNR: "
          + ", ".join(f"{site} {clean['psnr'][site]:.2f} dB" for site in honest))
    print("federation without the poisoned site (what excluding it costs the honest sites): "
          + ", ".join(f"{site} {without['psnr'][site] - clean['psnr'][site]:+.3f} dB" for site in honest))
    print(markdown_table(
        ["fault", "validation", "poisoned site rejected", *(f"{site} change dB" for site in honest), "worst |change|",
         f"within {TARGET_DB} dB", "worst |change| vs without it"],
        [[r["fault"], r["validation"], rules(r), *(r["delta"][site] for site in honest), r["worst_db"],
          "yes" if r["within_target"] else "NO", r["worst_vs_without_db"]] for r in runs],
    ))
    if len(by_seed) > 1:
        print(f"\nover seeds {args.seeds} ({args.kinds[0]} at {poisoned}, validation on):")
        print(markdown_table(
            ["honest site", "fault (on) - clean, mean dB", "fault (on) = without it, every seed",
             "clean spread over seeds dB"],
            [[site, f"{v['fault_on_minus_clean_mean_db']:+.3f}", "yes" if v["fault_on_equals_without"] else "NO",
              f"{v['clean_spread_db']:.3f}"] for site, v in seeds_summary.items()]))
    failed = [f"{r['fault']}" for r in runs if r["validation"] == "on" and not r["within_target"]]
    print(f"target (validation on, every honest site within {TARGET_DB} dB of clean), seed {args.seeds[0]} alone:",
          "met for every fault" if not failed else f"NOT met for {', '.join(failed)}")
    if len(by_seed) > 1:
        worst_mean = max(abs(v["fault_on_minus_clean_mean_db"]) for v in seeds_summary.values())
        print(f"on the mean over seeds {args.seeds} ({args.kinds[0]}): largest |change| {worst_mean:.3f} dB:",
              "met" if worst_mean <= TARGET_DB else "NOT met")
    path = write_results("robustness", {"poisoned_site": poisoned, "honest_sites": honest, "flags": argv,
                                        "validation_off": OFF, "target_db": TARGET_DB, "clean": clean,
                                        "without_poisoned_site": without, "runs": runs,
                                        "seeds": {str(k): v for k, v in by_seed.items()},
                                        "over_seeds": seeds_summary})
    print(f"figures: {path}; runs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
