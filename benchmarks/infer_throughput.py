"""Throughput of ``fedsr infer`` against a plain ``model(tensor)`` pass over the same slices (issue 11 target: >= 0.9x).

The scan: the real CT brain template (``../shared/data/ct``), its middle 108 slices, padded in-plane (edge values)
to 256 x 256, written as an int16 NIfTI. The model: the default family's tiny preset, x2 in-plane, perturbed off
its initial weights (an untrained one is plain interpolation; the cost is the same). Timed, alternately, ``--repeats``
times each (the best of each is reported: other processes share the machine):

- plain: the scan already normalised in memory, ``model(batch)`` over its slices in the batches ``fedsr infer``
  plans, nothing else;
- infer: :func:`client.inference.run.infer_scan` from the NIfTI file to the written ``.nii.gz`` (read, intensity
  mapping, SR, mapping back, interpolation of saturated voxels, gzip writing), the model already loaded.

Both wall time and this process's CPU time are reported: on a shared machine the wall time of one minute-long
pass swings by a third with the other processes' load, its CPU time far less (with ``--threads 1`` no worker
thread spins while waiting for a core).

    python benchmarks/infer_throughput.py [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from client.inference.model import load_model
from client.inference.run import InferOptions, infer_scan
from client.inference.scans import single_source
from shared_models.checkpoint import save_checkpoint
from shared_models.image import Normalisation
from shared_models.inference import plan_inference
from shared_models.registry import DEFAULT_MODEL, build_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPE = (256, 256, 108)
CT_RULE = {"modality": "CT", "kind": "ct-window", "range": [-160.0, 240.0]}


def ct_scan(folder: Path) -> Path:
    """The 256 x 256 x 108 CT (int16 HU, 1 mm) from the real template."""
    image = nib.load(DATA / "ct" / "ct_brain_atlas_1mm.nii.gz")
    hu = np.asarray(image.dataobj, dtype=np.int16)
    z0 = (hu.shape[2] - SHAPE[2]) // 2
    hu = hu[:, :, z0 : z0 + SHAPE[2]]
    pad = [((n - s) // 2, n - s - (n - s) // 2) for n, s in zip(SHAPE[:2], hu.shape[:2])]
    hu = np.pad(hu, [*pad, (0, 0)], mode="edge")
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, image.affine), path)
    return path


def checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(DEFAULT_MODEL, preset="tiny", scale=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return save_checkpoint(folder / "model.pt", model, scale=2, normalisation={"site": CT_RULE})


class Clock:
    """Wall seconds and this process's CPU seconds (all threads) of what runs inside ``with``."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = -time.perf_counter(), -time.process_time()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall += time.perf_counter()
        self.cpu += time.process_time()


@torch.no_grad()
def plain_pass(model: torch.nn.Module, volume: np.ndarray, batch: int) -> Clock:
    """``model(batch)`` over every slice of ``volume`` (normalised, in memory), nothing else."""
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, 2, 0)[:, None]))
    with Clock() as clock:
        for first in range(0, slices.shape[0], batch):
            model(slices[first : first + batch])
    return clock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="fedsr-infer-throughput-"))
    scan = ct_scan(folder)
    model = load_model(checkpoint(folder))
    hu = np.asarray(nib.load(scan).dataobj, dtype=np.float32)
    normalised = Normalisation("ct-window", *CT_RULE["range"]).apply(hu)
    plan = plan_inference(model.net, hu.shape)
    print(f"CT {'x'.join(map(str, hu.shape))} -> x2 in-plane, {model.family} tiny, {plan.batch_size} slices per "
          f"pass, {args.threads} threads, load average before {os.getloadavg()[0]:.1f}")
    plain_pass(model.net, normalised[:, :, :2], plan.batch_size)  # warm-up
    plain, infer = [], []
    for repeat in range(args.repeats):
        plain.append(plain_pass(model.net, normalised, plan.batch_size))
        with Clock() as clock:
            infer_scan(model, single_source(scan), folder / f"out{repeat}.nii.gz",
                       InferOptions(batch_size=plan.batch_size))
        infer.append(clock)
        print(f"  repeat {repeat + 1}: plain {plain[-1].wall:.1f} s ({plain[-1].cpu:.1f} s CPU), fedsr infer "
              f"{infer[-1].wall:.1f} s ({infer[-1].cpu:.1f} s CPU)")
    for what in ("wall", "cpu"):
        best_plain, best_infer = (min(getattr(c, what) for c in clocks) for clocks in (plain, infer))
        print(f"{what} time, best of {args.repeats}: plain model(tensor) {hu.shape[2] / best_plain:.2f} slices/s, "
              f"fedsr infer {hu.shape[2] / best_infer:.2f} slices/s: ratio {best_plain / best_infer:.3f} "
              "(target >= 0.9)")
    print(f"load average after {os.getloadavg()[0]:.1f}; files in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
