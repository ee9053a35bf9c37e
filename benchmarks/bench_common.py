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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the project is imported only by the helpers that use it (simulate_default needs none of it)
    from client.tasks.base import RoundJob
    from server.settings import RunSettings


#: Where the scripts of issue #10's targets write their figures (``NAME.json``).
RESULTS = Path(__file__).resolve().parent / "results"


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


def run_simulate(run_dir: Path, argv: Sequence[str]) -> float:
    """``fedsr simulate --run-dir RUN_DIR ARGV``; returns its wall seconds. Exits with the end of its output (and the
    command) when it fails, so that a benchmark never reports a number of a run that did not finish."""
    command = [*fedsr_command(), "simulate", "--run-dir", str(run_dir), *argv]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def write_results(name: str, figures: Any) -> Path:
    """``benchmarks/results/NAME.json`` (atomically): a benchmark's figures, for the README and later comparison."""
    from shared_models.atomic import atomic_write

    text = json.dumps(figures, indent=1, default=str) + "\n"
    return atomic_write(RESULTS / f"{name}.json", lambda handle: handle.write(text.encode("utf-8")))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with two decimals, None as ``-``."""
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
