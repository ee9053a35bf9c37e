"""A large simulated federation on this machine: 20 phantom sites, the tiny preset, and the number of sites per
round varied with ``--fraction-train`` / ``--fraction-evaluate`` (0.25, 0.5, 1.0: 5, 10 and 20 sites a round).

For each fraction, one ``fedsr simulate`` on the same 20 sites (a fresh copy each), while this script samples the
memory of its whole process tree (the command, the runner, Ray's processes and workers) every 0.25 s:

- peak resident memory: the sum of every process's RSS (an upper bound: pages shared between processes, such as
  torch's libraries, count once per process) and of its PSS (shared pages split between their processes: what
  the tree really holds), over the whole run and over the federated rounds only (before the cross-site
  evaluation, which visits every site);
- wall time per round: between the last ``metrics.jsonl`` rows of consecutive rounds (a round includes preparing
  the sites drawn for the first time).

Linearity: a least-squares line ``seconds per round = a + b x sites per round`` through the three runs, its R^2
and each run's deviation from it. Targets: peak memory under 8 GiB; the time per round linear in the sites per
round (R^2 >= 0.95). Writes ``benchmarks/results/scale.json``.

    python benchmarks/scale.py [--sites 20] [--fractions 0.25 0.5 1.0] [--out DIR] [fedsr simulate flags ...]

The full run: three 20-site federations of 5 rounds (about 20 minutes on 2 cores); ``--rounds 2 --local-steps 5``
for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench_common import fedsr_command, markdown_table, run_rows, write_results
from simulation.phantoms import write_phantom_sites

GIB = 2**30
MEMORY_TARGET_GIB = 8.0
LINEAR_R2 = 0.95
SAMPLE_SECONDS = 0.25


class TreeMemory:
    """Samples the resident memory of a process and all its descendants from ``/proc`` (Linux) in a thread.

    psutil would do this portably, but it is no dependency of fedsr (only Ray carries a private copy); ``/proc`` is
    three small files per process. ``samples``: (time.time(), RSS bytes summed, PSS bytes summed, processes).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            pids = self.tree()
            rss = pss = 0
            for pid in pids:
                rss += _kib(f"/proc/{pid}/status", "VmRSS:")
                pss += _kib(f"/proc/{pid}/smaps_rollup", "Pss:")
            self.samples.append((time.time(), rss * 1024, pss * 1024, len(pids)))

    def tree(self) -> list[int]:
        """``pid`` and its descendants (each process's parent from ``/proc/PID/stat``)."""
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(entry.path, "stat").read_text()
                except OSError:  # the process ended meanwhile
                    continue
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found


def _kib(path: str, field: str) -> int:
    """The kB value of ``field`` in a ``/proc`` file; 0 when the process is gone or has no such field (a zombie)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run(run_dir: Path, sites: Path, fraction: float, extra: list[str]) -> dict:
    """One federation with ``fraction`` of the sites per round; returns its figures."""
    copy = run_dir.parent / "sites"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(sites, copy)
    command = [*fedsr_command(), "simulate", "--run-dir", str(run_dir), "--sites-dir", str(copy), "--preset", "tiny",
               "--baselines", "none", "--fraction-train", str(fraction), "--fraction-evaluate", str(fraction), *extra]
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        with TreeMemory(proc.pid) as memory:
            out, _ = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{out[-3000:]}")
    rows = [r for r in run_rows(run_dir) if r["experiment"] == "global"]
    ends = {}
    for row in rows:
        ends[row["round"]] = max(ends.get(row["round"], 0.0), row["time"])
    rounds = sorted(ends)
    per_round = [ends[r] - ends[previous] for previous, r in zip(rounds, rounds[1:])]
    trained = [len({r["site"] for r in rows if r["round"] == n and r["phase"] == "train"}) for n in rounds[1:]]
    messages = [json.loads(line) for line in (run_dir / "messages.jsonl").read_text().splitlines()]
    cross_start = min((m["time"] for m in messages if m["part"] == "cross-site"), default=float("inf"))
    training = [s for s in memory.samples if s[0] < cross_start] or memory.samples
    return {
        "fraction": fraction, "sites_per_round": float(np.mean(trained)),
        "seconds_per_round": float(np.mean(per_round)), "round_seconds": per_round, "wall_seconds": wall,
        "peak_rss_gib": _peak(memory.samples, 1), "peak_pss_gib": _peak(memory.samples, 2),
        "peak_rss_rounds_gib": _peak(training, 1), "peak_pss_rounds_gib": _peak(training, 2),
        "processes": max(s[3] for s in memory.samples),
    }


def _peak(samples: list[tuple[float, int, int, int]], column: int) -> float:
    """The largest value (GiB) of one column of :class:`TreeMemory` samples (1: RSS, 2: PSS)."""
    return max(sample[column] for sample in samples) / GIB


def linear_fit(x: list[float], y: list[float]) -> dict:
    """Least-squares ``y = a + b x`` (numpy.polyfit), R^2 and each point's relative deviation from the line."""
    slope, intercept = np.polyfit(x, y, 1)
    fitted = intercept + slope * np.asarray(x)
    residual = float(np.sum((np.asarray(y) - fitted) ** 2))
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    return {"intercept_seconds": float(intercept), "seconds_per_site": float(slope),
            "r2": 1.0 - residual / total if total else 1.0,
            "deviation": [float(v) for v in (np.asarray(y) - fitted) / fitted]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--out", type=Path, default=None)
    args, extra = parser.parse_known_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsr-scale-"))
    sites = out / "sites"
    if not sites.exists():
        write_phantom_sites(sites, n_sites=args.sites)
    runs = []
    for fraction in args.fractions:
        runs.append(run(out / f"fraction-{fraction:g}" / "run", sites, fraction, extra))
        print(f"  fraction {fraction:g}: {runs[-1]['wall_seconds']:.0f} s, peak RSS {runs[-1]['peak_rss_gib']:.2f} GiB",
              flush=True)
    fit = linear_fit([r["sites_per_round"] for r in runs], [r["seconds_per_round"] for r in runs])
    print(f"\n{args.sites} sites, tiny preset; extra flags: {' '.join(extra) or '-'}")
    print(markdown_table(
        ["fraction", "sites per round", "s per round", "off the line", "peak RSS GiB (rounds)", "peak PSS GiB (rounds)",
         "processes", "end to end s"],
        [[f"{r['fraction']:g}", f"{r['sites_per_round']:.1f}", r["seconds_per_round"], f"{d:+.1%}",
          f"{r['peak_rss_gib']:.2f} ({r['peak_rss_rounds_gib']:.2f})",
          f"{r['peak_pss_gib']:.2f} ({r['peak_pss_rounds_gib']:.2f})", r["processes"], r["wall_seconds"]]
         for r, d in zip(runs, fit["deviation"])],
    ))
    peak = max(r["peak_rss_gib"] for r in runs)
    print(f"seconds per round = {fit['intercept_seconds']:.2f} + {fit['seconds_per_site']:.2f} x sites (R^2 "
          f"{fit['r2']:.3f}; target >= {LINEAR_R2}); peak RSS {peak:.2f} GiB (target < {MEMORY_TARGET_GIB:g})")
    print("targets:", "met" if fit["r2"] >= LINEAR_R2 and peak < MEMORY_TARGET_GIB else "NOT met")
    path = write_results("scale", {"sites": args.sites, "flags": extra, "runs": runs, "fit": fit,
                                   "memory_target_gib": MEMORY_TARGET_GIB, "linear_r2_target": LINEAR_R2})
    print(f"figures: {path}; runs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
