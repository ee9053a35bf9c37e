"""Privacy against quality, and an empirical check of the guarantee: the default federation (3 phantom sites, 5
rounds; no baselines) with DP-SGD at target epsilons 1, 4 and 16 per patient, and without DP.

For each run, from its report.json: the global model's test PSNR at every site (mean over sites, and its gain over
interpolation), the epsilon the sites' ledgers reached, and the membership-inference check every run makes of
its global model (client/membership.py: a loss-threshold attack at each site, training patients' slices against
its never-seen test patients'; AUC 0.5 = the attacker cannot tell; advantage = best TPR - FPR), averaged over the
sites. For epsilon-DP the advantage is at most e^epsilon - 1 (Yeom et al.), a bound that means something only for
small epsilon; the attack shows what a simple attacker actually gets.

Each run gets fresh phantom sites (its own ledgers). Prints a markdown table and writes a plot (PSNR and attack AUC
against epsilon) and the figures as JSON.

    python benchmarks/privacy_sweep.py [--out DIR] [--epsilons 1 4 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench_common import fedsr_command
from client.data.files import site_folders
from client.privacy_ledger import PrivacyLedger
from client.state import DEFAULT_STATE_DIR_NAME


def run(run_dir: Path, epsilon: float | None) -> None:
    dp = ["--dp", "local", "--dp-target-epsilon", str(epsilon)] if epsilon else []
    done = subprocess.run([*fedsr_command(), "simulate", "--run-dir", str(run_dir), "--baselines", "none", *dp],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run {run_dir} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def spent(run_dir: Path) -> float:
    return max(PrivacyLedger.open(Path(folder) / DEFAULT_STATE_DIR_NAME).epsilon("patient", 1e-5)
               for folder in site_folders(str(run_dir / "sites")))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if r["epsilon"] is not None]
    plain = next(r for r in rows if r["epsilon"] is None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot([r["epsilon"] for r in dp], [r["psnr"] for r in dp], "o-", label="DP-SGD (patient)")
    left.axhline(plain["psnr"], color="k", ls="--", label="no DP")
    left.axhline(plain["interpolation_psnr"], color="gray", ls=":", label="interpolation")
    left.set(xscale="log", xlabel="target epsilon per patient", ylabel="global test PSNR (dB)",
             title="Quality")
    left.legend(fontsize=8)
    right.plot([r["epsilon"] for r in dp], [r["attack_auc"] for r in dp], "o-", color="C3", label="DP-SGD")
    right.axhline(plain["attack_auc"], color="k", ls="--", label="no DP")
    right.axhline(0.5, color="gray", ls=":", label="chance")
    right.set(xscale="log", xlabel="target epsilon per patient", ylabel="attack AUC",
              title="Membership inference (loss threshold)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsr-privacy-sweep-"))
    rows = []
    for epsilon in [*args.epsilons, None]:
        run_dir = out / (f"eps-{epsilon:g}" if epsilon else "no-dp")
        if not (run_dir / "report.json").exists():  # a finished run of an earlier call with the same --out
            run(run_dir, epsilon)
        report = json.loads((run_dir / "report.json").read_text())
        psnr = report["cross_site"]["psnr"]
        attack = report["privacy"]["membership"]
        rows.append({"epsilon": epsilon, "spent": spent(run_dir) if epsilon else None,
                     "psnr": float(np.mean([c["mean"] for c in psnr["global"].values()])),
                     "interpolation_psnr": float(np.mean([c["mean"] for c in psnr["interpolation"].values()])),
                     "attack_auc": float(np.mean([m["mia-auc"] for m in attack.values()])),
                     "attack_advantage": float(np.mean([m["mia-advantage"] for m in attack.values()])),
                     "slices": "{} / {}".format(*(int(sum(m[k] for m in attack.values()))
                                                  for k in ("mia-members", "mia-non-members")))})
    (out / "privacy_sweep.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "privacy_sweep.png")
    print("| target epsilon | spent (max over sites) | global test PSNR | gain over interpolation | attack AUC | "
          "attack advantage |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = f"{r['epsilon']:g}" if r["epsilon"] else "no DP"
        used = f"{r['spent']:.2f}" if r["spent"] is not None else "-"
        print(f"| {name} | {used} | {r['psnr']:.2f} dB | {r['psnr'] - r['interpolation_psnr']:+.2f} dB | "
              f"{r['attack_auc']:.3f} | {r['attack_advantage']:.3f} |")
    print(f"attack: mean over the 3 sites; slices of training / test patients in all: {rows[0]['slices']}; plot "
          f"and JSON in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
