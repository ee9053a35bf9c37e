"""The README's first command, measured: default ``fedsr simulate`` wall time and each site's PSNR gain.

Runs ``fedsr simulate`` with its defaults (3 phantom sites) in a temporary run folder, then prints the end-to-end
wall time (phantom generation and Ray start-up included) and, per site, the final global model's PSNR and SSIM
beside the bicubic baseline of the same LR input on that site's validation scans.

    python -m benchmarks.simulate_default [--sites-dir DIR] [extra fedsr simulate flags ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="fedsr-bench-")) / "run"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "simulation.cli", "simulate", "--run-dir", str(run_dir), *argv],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return proc.returncode
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"fedsr simulate {' '.join(argv) or '(defaults)'}: {wall:.1f} s end to end "
          f"(ServerApp {summary['wall_seconds']:.1f} s), {summary['rounds']} rounds")
    worst = min(m["psnr"] - m["bicubic_psnr"] for m in summary["sites"].values())
    for site, m in sorted(summary["sites"].items()):
        print(f"  {site:<24} PSNR {m['psnr']:.2f} dB vs bicubic {m['bicubic_psnr']:.2f} dB "
              f"(gain {m['psnr'] - m['bicubic_psnr']:+.2f}); SSIM {m['ssim']:.4f} vs {m['bicubic_ssim']:.4f}")
    print(f"smallest gain over bicubic: {worst:+.2f} dB; run folder {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
