"""Speed of the small steps the tests used to time, each beside a baseline measured in the same run.

The tests check behaviour only; how fast these steps are is measured here (a shared 2-core machine makes
wall-time asserts in tests flaky). Each line prints the measured seconds, the baseline of the same run, their
ratio, and the budget the old test asserted (for reference, not enforced):

- ``degrade``: in-plane degradation of a typical 128x128x64 volume to scale 4 (``client.degrade.degrade_inplane``),
  per acquisition profile, against one in-plane FFT + inverse FFT of the same float32 volume with ``scipy.fft``
  (the library the k-space models use; the least a k-space acquisition model does). Old budget 0.5 s.
- ``phantoms``: writing the default phantom sites (3 sites x 6 subjects, 96x96x48), against writing the same
  number of volumes of that shape as .nii.gz with nibabel (the file-writing floor). Old budget 20 s.
- ``smore``: SMORE tiny overfitting a real T1 patch (Colin27, 2 mm slice profile) until its L1 loss drops 10x,
  beside EDSR tiny running the same number of Adam steps on the same patch (2x2-mean LR). Old budget 15 s.

    python benchmarks/speed_checks.py [--only degrade,phantoms,smore] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

CHECKS = ("degrade", "phantoms", "smore")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def line(what: str, seconds: float, baseline_name: str, baseline: float, budget: float) -> None:
    print(f"  {what:<34} {seconds:7.3f} s   {baseline_name} {baseline:7.3f} s   ratio {seconds / baseline:6.1f}   "
          f"(old test budget {budget:g} s)", flush=True)


def check_degrade(repeats: int) -> None:
    import numpy as np
    import scipy.fft as sfft

    from client.degrade import PRESETS, degrade_inplane

    hr = np.random.default_rng(0).random((128, 128, 64), dtype=np.float32)
    spacing = (1.0, 1.0, 1.0)
    fft = best_of(lambda: sfft.ifft2(sfft.fft2(hr, axes=(0, 1)), axes=(0, 1)), repeats)
    print("degrade_inplane, 128x128x64 volume, scale 4 (median of", repeats, "runs):")
    for name in ("mr-1.5t-kspace", "mr-psf"):
        seconds = best_of(lambda: degrade_inplane(hr, PRESETS[name], 4, spacing, np.random.default_rng(0)), repeats)
        line(name, seconds, "2D FFT+iFFT", fft, 0.5)


def check_phantoms() -> None:
    import nibabel as nib
    import numpy as np

    from simulation.phantoms import write_phantom_sites

    shape, n_sites, subjects = (96, 96, 48), 3, 6
    with tempfile.TemporaryDirectory(prefix="fedsr-speed-") as tmp:
        start = time.perf_counter()
        write_phantom_sites(Path(tmp) / "sites", n_sites=n_sites, subjects_per_site=subjects, shape=shape)
        seconds = time.perf_counter() - start
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for i in range(n_sites * subjects):
            volume = (rng.random(shape, dtype=np.float32) * 1000).astype(np.float32)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), Path(tmp) / f"plain-{i}.nii.gz")
        floor = time.perf_counter() - start
    print(f"default phantom sites ({n_sites} sites x {subjects} subjects, {'x'.join(map(str, shape))}):")
    line("write_phantom_sites", seconds, "nibabel writes", floor, 20.0)


def check_smore() -> None:
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    from client.degrade import slice_profile_subsample
    from shared_models.registry import build_model

    image = nib.load(DATA / "mri" / "colin27_t1_1mm.nii.gz")
    hr = np.asarray(image.dataobj[70:102, 100:132, 90], dtype=np.float32) / 255.0
    hr_t = torch.from_numpy(hr)[None, None]

    def overfit(model: torch.nn.Module, lr_t: torch.Tensor, max_steps: int, stop_at_tenth: bool) -> tuple[int, float]:
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        start = time.perf_counter()
        with torch.no_grad():
            first = F.l1_loss(model(lr_t), hr_t).item()
        step = 0
        for step in range(1, max_steps + 1):
            optimiser.zero_grad()
            loss = F.l1_loss(model(lr_t), hr_t)
            loss.backward()
            optimiser.step()
            if stop_at_tenth and loss.item() < first / 10:
                break
        return step, time.perf_counter() - start

    torch.manual_seed(0)
    smore = build_model("smore", preset="tiny", scale=2, global_residual=False)
    lr_smore = torch.from_numpy(slice_profile_subsample(hr, 2, 1, 2.0, 1.0))[None, None]
    steps, seconds = overfit(smore, lr_smore, 300, True)
    torch.manual_seed(0)
    edsr = build_model("edsr", preset="tiny", scale=2)
    _, baseline = overfit(edsr, F.avg_pool2d(hr_t, 2), steps, False)
    print(f"overfitting one 32x32 Colin27 patch ({torch.get_num_threads()} torch threads):")
    line(f"SMORE tiny, {steps} steps to loss/10", seconds, f"EDSR tiny {steps} steps", baseline, 15.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CHECKS), help="comma-separated subset of " + ", ".join(CHECKS))
    parser.add_argument("--repeats", type=int, default=5, help="runs per timing of the degrade check (median)")
    args = parser.parse_args()
    chosen = args.only.split(",")
    unknown = set(chosen) - set(CHECKS)
    if unknown:
        parser.error(f"unknown check(s) {', '.join(sorted(unknown))}; known: {', '.join(CHECKS)}")
    if "degrade" in chosen:
        check_degrade(args.repeats)
    if "phantoms" in chosen:
        check_phantoms()
    if "smore" in chosen:
        check_smore()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
