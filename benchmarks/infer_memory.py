"""Peak memory of ``fedsr infer`` on a large scan: 512 x 512 x 300 at x2 in-plane on the CPU (issue 11 target: under
3 GiB).

The scan: the real CT brain template (``../shared/data/ct``) resampled (linear) to 512 x 512 x 300, int16 HU, an
uncompressed NIfTI. The model: the default family's tiny preset, x2 in-plane. The command runs as a child process
(``fedsr infer``, the console script), once per output format; its peak resident memory is the child's
``ru_maxrss``. For scale: the input is 0.15 GiB as int16, 0.29 GiB as the float32 the reader returns; the output
(1024 x 1024 x 300) is 0.59 GiB as int16 and 1.17 GiB as float32, and is written as it is produced.

    python benchmarks/infer_memory.py [--slices 300] [--formats nifti dicom]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import zoom

from bench_common import fedsr_command
from shared_models.checkpoint import save_checkpoint
from shared_models.registry import DEFAULT_MODEL, build_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CT_RULE = {"modality": "CT", "kind": "ct-window", "range": [-160.0, 240.0]}
GIB = 1 << 30
#: Runs its arguments as one child process and prints that child's peak resident memory in bytes (ru_maxrss, KiB
#: on Linux): a wrapper per run, so each figure is that run's alone.
MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(code)
"""


def large_ct(folder: Path, slices: int) -> Path:
    """The CT template resampled to 512 x 512 x ``slices``, spacing scaled to keep its field of view."""
    image = nib.load(DATA / "ct" / "ct_brain_atlas_1mm.nii.gz")
    hu = np.asarray(image.dataobj, dtype=np.float32)
    factors = np.array([512, 512, slices]) / hu.shape
    big = np.rint(zoom(hu, factors, order=1)).astype(np.int16)
    affine = image.affine @ np.diag([*(1.0 / factors), 1.0])
    path = folder / "large_ct.nii"
    nib.save(nib.Nifti1Image(big, affine), path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--formats", nargs="+", choices=("nifti", "dicom"), default=["nifti", "dicom"])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fedsr-infer-memory-"))
    scan = large_ct(folder, args.slices)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(folder / "model.pt", build_model(DEFAULT_MODEL, preset="tiny", scale=2), scale=2,
                                 normalisation={"site": CT_RULE})
    print(f"CT 512x512x{args.slices} (int16, {scan.stat().st_size / GIB:.2f} GiB) -> x2 in-plane, {DEFAULT_MODEL} "
          f"tiny, CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for output_format in args.formats:
        output = folder / ("out.nii.gz" if output_format == "nifti" else "out_series")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", MEASURE, *fedsr_command(), "infer", str(checkpoint), str(scan),
                               str(output), "--device", "cpu"], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return proc.returncode
        peak = int(proc.stdout.split()[-1])
        size = sum(p.stat().st_size for p in ([output] if output.is_file() else output.iterdir()))
        print(f"  {output_format}: peak resident memory {peak / GIB:.2f} GiB (target < 3), {wall:.0f} s, "
              f"output {size / GIB:.2f} GiB on disk; load average {os.getloadavg()[0]:.1f}")
    print(f"files in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
