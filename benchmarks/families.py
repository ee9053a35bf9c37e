"""Every model family after the default budget: ``fedsr simulate --model F`` on the default phantom sites.

Prints, per family, the end-to-end wall time and each site's PSNR gain over its interpolation baseline (bicubic;
for ``smore``: 1D cubic through-plane, since SMORE restores slice thickness).

    python benchmarks/families.py [--families srcnn,edsr,gan,swinir,smore] [extra fedsr simulate flags ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench_common import fedsr_command

FAMILIES = ("srcnn", "edsr", "gan", "swinir", "smore")


def run_family(family: str, root: Path, extra: list[str]) -> dict:
    """One default run; returns wall seconds and per-site gains (dB)."""
    run_dir = root / family
    start = time.perf_counter()
    proc = subprocess.run(
        [*fedsr_command(), "simulate", "--model", family, "--run-dir", str(run_dir),
         "--sites-dir", str(root / "sites"), *extra],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{family} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    gains = {site: m["psnr"] - m["baseline-psnr"] for site, m in summary["sites"].items()}
    return {"seconds": time.perf_counter() - start, "gains": gains}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    args, extra = parser.parse_known_args()
    root = Path(tempfile.mkdtemp(prefix="fedsr-families-"))
    subprocess.run([*fedsr_command(), "sites", "make-phantoms", str(root / "sites")],
                   check=True, capture_output=True)
    print(f"{'family':<8} {'wall s':>7}  gain over the baseline per site (dB)        smallest")
    for family in args.families.split(","):
        result = run_family(family, root, extra)
        gains = "  ".join(f"{site} {gain:+.2f}" for site, gain in sorted(result["gains"].items()))
        print(f"{family:<8} {result['seconds']:7.1f}  {gains}  {min(result['gains'].values()):+.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
