"""Cross-site generalisation targets, measured: the federated model against what each site could train alone, the
pooled data, and unseen scanners; plus what the cross-site evaluation costs.

Runs ``fedsr simulate --baselines local,pooled --leave-one-out`` on the default phantom sites and on site folders
cut from the real scans in ``../shared/data`` (``real_sites.py``), then prints, from each run's ``report.json``:

- per site: the global model's test PSNR, the mean of the local-only models' PSNR there, and whether the first is at
  least the second (target);
- on the pooled test scans: global vs pooled PSNR (target: within 0.3 dB);
- leave-one-out: the model trained without the site, at that site, vs every local-only model trained elsewhere
  (target: it beats each);
- the cost of the cross-site evaluation against M x N single evaluation passes timed in this process (target: at
  most 10 % more).

    python benchmarks/cross_site.py [--only phantom|real] [extra fedsr simulate flags ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench_common import fedsr_command
from real_sites import write_real_sites


def run(sites_dir: Path | None, extra: list[str]) -> Path:
    """One ``fedsr simulate`` with both baselines and leave-one-out; returns the run folder."""
    run_dir = Path(tempfile.mkdtemp(prefix="fedsr-cross-")) / "run"
    argv = [*fedsr_command(), "simulate", "--run-dir", str(run_dir), "--baselines", "local,pooled", "--leave-one-out"]
    argv += ["--sites-dir", str(sites_dir)] if sites_dir else []
    start = time.perf_counter()
    proc = subprocess.run([*argv, *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fedsr simulate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"  {' '.join(argv[1:])}: {time.perf_counter() - start:.0f} s")
    return run_dir


def targets(report: dict) -> list[tuple[str, bool]]:
    """Print the table of one run; returns (target, met) pairs."""
    psnr = report["cross_site"]["psnr"]
    sites = sorted(report["sites"])
    met = []
    print(f"  {'site':<26}{'global':>8}{'local mean':>12}{'unseen':>8}{'best local elsewhere':>22}")
    for site in sites:
        global_ = psnr["global"][site]["mean"]
        locals_here = [psnr[m][site]["mean"] for m in psnr if m.startswith("local:") and site in psnr[m]]
        elsewhere = {m: psnr[m][site]["mean"] for m in psnr if m.startswith("local:") and m != f"local:{site}"
                     and site in psnr[m]}
        unseen = psnr.get(f"holdout:{site}", {}).get(site, {}).get("mean")
        local_mean = sum(locals_here) / len(locals_here)
        best = max(elsewhere.items(), key=lambda item: item[1]) if elsewhere else ("-", float("nan"))
        print(f"  {site:<26}{global_:>8.2f}{local_mean:>12.2f}{unseen or float('nan'):>8.2f}"
              f"{best[1]:>10.2f} ({best[0].removeprefix('local:')})")
        met.append((f"{site}: global >= mean local", global_ >= local_mean))
        if unseen is not None and elsewhere:
            met.append((f"{site}: unseen beats every local elsewhere", unseen > best[1]))
    pooled = report.get("pooled_test", {}).get("psnr", {})
    if "pooled" in pooled and "global" in pooled:
        gap = pooled["pooled"]["mean"] - pooled["global"]["mean"]
        print(f"  pooled test scans: global {pooled['global']['mean']:.2f} dB, pooled {pooled['pooled']['mean']:.2f} dB"
              f" (gap {gap:+.2f} dB)")
        met.append(("global within 0.3 dB of pooled", gap <= 0.3))
    return met


def evaluation_cost(run_dir: Path, cross: dict) -> float:
    """The run's cross-site evaluation time / the sum over its matrix cells of one evaluation pass, timed here."""
    from client.cross_site import score_models
    from client.tasks import RoundJob, task_for
    from server.run_log import read_run_config
    from server.settings import RunSettings
    from shared_models.registry import build_from_settings

    settings = RunSettings.from_run_config(read_run_config(run_dir))
    job = RoundJob.from_config({**settings.round_config(), "server-round": settings.num_rounds}, torch.device("cpu"))
    task, model = task_for(job.model), build_from_settings(job)
    weights = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    expected = 0.0
    for folder in sorted(Path(settings.sites_dir).iterdir()):
        site = task.prepare(str(folder), job)
        if site.name not in cross["sites"] or not site.test:
            continue
        both = _timed(lambda: score_models(task, model, site, job, {"global": weights}))  # a model + interpolation
        interpolation = _timed(lambda: score_models(task, model, site, job, {}))
        cells = sum(1 for cells in cross["scores"].values() if site.name in cells)  # the interpolation is one
        expected += (cells - 1) * (both - interpolation) + interpolation
    return cross["seconds"] / expected


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("phantom", "real"))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args, extra = parser.parse_known_args()
    runs = {}
    if args.only != "real":
        runs["phantom sites (defaults)"] = None
    if args.only != "phantom":
        runs["real scans (../shared/data)"] = write_real_sites(args.data, Path(tempfile.mkdtemp(prefix="fedsr-real-")) / "sites")
    failed = []
    for title, sites_dir in runs.items():
        print(f"{title}:")
        run_dir = run(sites_dir, extra)
        report = json.loads((run_dir / "report.json").read_text())
        met = targets(report)
        ratio = evaluation_cost(run_dir, json.loads((run_dir / "cross_site.json").read_text()))
        print(f"  cross-site evaluation: {ratio:.2f} x the sum of single passes (target <= 1.10)")
        met.append(("cross-site evaluation <= 1.1 x single passes", ratio <= 1.10))
        failed += [f"{title}: {name}" for name, ok in met if not ok]
        print(f"  report: {run_dir / 'report.html'}")
    print("targets not met:" if failed else "every target met", *failed, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
