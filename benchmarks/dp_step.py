"""Cost of a DP-SGD local step against a plain one, in the same process on the same data (target: at most 2x).

Both run the site's local training as the ClientApp does, on one phantom site prepared once: the plain one through
the supervised task's non-DP ``fit`` (sampler, L1, Adam), the DP one through ``client.privacy.private_fit`` with the
patient as unit (Poisson sampling over patients, per-patch gradients from Opacus, per-patient clipping, noise) and
the same expected patches per step. Both on one thread, for every family whose DP path is built; seconds per step
are the best of ``--repeats`` rounds, the ratio is DP over plain.

    python benchmarks/dp_step.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import round_job
from client.paired import paired_for
from client.pairs import prepare_site
from client.privacy import private_fit
from client.state import DEFAULT_STATE_DIR_NAME
from client.tasks import task_for
from server.settings import RunSettings
from shared_models.registry import build_from_settings
from simulation.phantoms import write_phantom_sites

FAMILIES = ("edsr", "srcnn", "swinir", "rrdb")


def seconds_per_step(fit, steps: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fit()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="fedsr-dp-bench-"))
    (folder,) = write_phantom_sites(root, n_sites=1, subjects_per_site=8)
    print(f"seconds per local step, one thread, batch 16 patches (DP: patient unit, 8 patches per patient, "
          f"Poisson over patients), {args.steps} steps, best of {args.repeats}")
    print(f"{'family':8} {'plain':>9} {'DP':>9} {'ratio':>7}  (target <= 2)")
    for name in FAMILIES:
        settings = RunSettings(model=name, local_steps=args.steps, num_rounds=1000, dp="local",
                               dp_noise_multiplier=1.0)
        job = round_job(settings, 1).replace(node_config={"state-dir": str(root / "state" / name)})
        task = task_for(name)
        site = prepare_site(str(folder), job.scale, task.pairing(job))
        model = build_from_settings(job)
        plain = seconds_per_step(lambda: task.fit(model, site, job, np.random.default_rng(0)), args.steps,
                                 args.repeats)
        private = seconds_per_step(lambda: private_fit(model, site, job, np.random.default_rng(0)), args.steps,
                                   args.repeats)
        print(f"{name:8} {plain:9.4f} {private:9.4f} {private / plain:7.2f}")
    assert not (folder / DEFAULT_STATE_DIR_NAME).exists()  # the ledgers went to the benchmark's own state folders
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
