"""Memory of 3D training: peak resident memory of local training steps with 32^3 HR patches, per 3D family.

Each configuration runs in a fresh process (so one's peak does not hide another's) and reports the peak RSS
(``resource.getrusage``) after ``--steps`` optimiser steps, against the same process's RSS before training.

    python benchmarks/memory3d.py [--steps 5] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def measure(family: str, preset: str, batch: int, steps: int) -> dict:
    """In this process: build the 3D model, train ``steps`` steps on random 32^3 HR / 16^3 LR patches."""
    import torch

    from shared_models.losses import build_loss
    from shared_models.registry import build_model

    torch.manual_seed(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model(family, preset=preset, spatial_dims=3, scale=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = build_loss({"l1": 1.0})
    for _ in range(steps):
        lr, hr = torch.rand(batch, 1, 16, 16, 16), torch.rand(batch, 1, 32, 32, 32)
        optimiser.zero_grad()
        loss(model(lr), hr).backward()
        optimiser.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"family": family, "preset": preset, "before_mib": before / 1024, "peak_mib": peak / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "PRESET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.batch_size, args.steps)))
        return 0
    print(f"3D training, HR patches 32^3 (LR 16^3), batch {args.batch_size}, {args.steps} steps, CPU")
    for family, preset in (("edsr", "small"), ("srcnn", "small"), ("edsr", "base")):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", family, preset,
                              "--steps", str(args.steps), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout)
        print(f"  {family}-{preset}: peak RSS {row['peak_mib'] / 1024:.2f} GiB "
              f"(process before training {row['before_mib'] / 1024:.2f} GiB; budget 4 GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
