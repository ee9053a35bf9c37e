"""Helpers shared by the benchmark scripts.

``benchmarks/`` is a folder of scripts, not a package (Opacus installs a top-level package named ``benchmarks``;
a project package of the same name would shadow it or be shadowed by it depending on the working directory).
Each script is run as ``python benchmarks/NAME.py``; Python puts the script's folder first on ``sys.path``, so
every script imports this module as ``import bench_common`` wherever it is started from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the project is imported only by the helpers that use it (simulate_default needs none of it)
    from client.tasks.base import RoundJob
    from server.settings import RunSettings


def fedsr_command() -> list[str]:
    """The ``fedsr`` command of this interpreter's environment (the console script beside it)."""
    script = Path(sys.executable).with_name("fedsr")
    if not script.exists():
        raise FileNotFoundError(f"no fedsr command beside {sys.executable}; install the project (pip install -e .)")
    return [str(script)]


def round_job(settings: RunSettings, server_round: int) -> RoundJob:
    """The instructions a client gets in a round: the coordinator's ConfigRecord, read as the ClientApp reads it."""
    import torch

    from client.tasks.base import RoundJob

    return RoundJob.from_config({**settings.round_config(), "server-round": server_round}, torch.device("cpu"))


def simulate_and_report(argv: list[str]) -> int:
    """Run ``fedsr simulate ARGV`` in a temporary run folder; print its wall time and each site's gain over its
    interpolation baseline (bicubic for in-plane SR; the method is recorded in ``metrics.jsonl``)."""
    run_dir = Path(tempfile.mkdtemp(prefix="fedsr-bench-")) / "run"
    start = time.perf_counter()
    proc = subprocess.run([*fedsr_command(), "simulate", "--run-dir", str(run_dir), *argv],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return proc.returncode
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"fedsr simulate {' '.join(argv) or '(defaults)'}: {wall:.1f} s end to end "
          f"(ServerApp {summary['wall_seconds']:.1f} s), {summary['rounds']} rounds")
    worst = min(m["psnr"] - m["baseline-psnr"] for m in summary["sites"].values())
    for site, m in sorted(summary["sites"].items()):
        print(f"  {site:<24} PSNR {m['psnr']:.2f} dB vs baseline {m['baseline-psnr']:.2f} dB "
              f"(gain {m['psnr'] - m['baseline-psnr']:+.2f}); SSIM {m['ssim']:.4f} vs {m['baseline-ssim']:.4f}")
    print(f"smallest gain over the baseline: {worst:+.2f} dB; run folder {run_dir}")
    return 0
