"""Degrade -> ``fedsr infer`` -> compare, on the real scans in ``../shared/data`` (issue 11 target: the output beats
the interpolation baseline).

For each case a tiny in-plane x2 model of the default family is trained for ``--steps`` steps on LR/HR patches of a
training scan (the site's acquisition model of its modality, :func:`client.degrade.degrade_inplane`), saved as a
checkpoint with the intensity rule, and applied with the ``fedsr infer`` command to another scan's LR version, written
as a NIfTI file in scanner units on the LR grid. The output is compared with that scan's HR (both through the HR's
intensity mapping) on every slice of the test region with foreground, as is the interpolation baseline: the same
``fedsr infer`` run with the untrained model (exactly bicubic, through the same intensity mapping, which clamps a
noisy background the plain bicubic keeps; the plain bicubic is printed too). The output's affine is checked against
the HR's (the same field of view, so the same grid).

- MR: trained on Colin27, tested on the ICBM152 template (another head).
- CT: the CT template, trained on its lower half of slices, tested on the upper half.

    python benchmarks/infer_quality.py [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bench_common import fedsr_command
from client.data.nifti import read_nifti
from client.data.normalise import fit_normalisation
from client.degrade import DEFAULT_PRESET, PRESETS, degrade_inplane
from client.pairs import ScanPair
from client.training import PatchSampler, train_supervised
from shared_models.checkpoint import save_checkpoint
from shared_models.image import ScanImage
from shared_models.metrics import psnr, ssim
from shared_models.registry import DEFAULT_MODEL, build_model
from shared_models.resample import upsample_baseline

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RULES = {"MR": {"modality": "MR", "kind": "mr-percentile", "range": [0.5, 99.5]},
         "CT": {"modality": "CT", "kind": "ct-window", "range": [-160.0, 240.0]}}
FOREGROUND = 0.05  # a test slice counts when some HR voxel is above this (normalised)


def pair(path: Path, modality: str, z: slice, seed: int) -> ScanPair:
    """HR (normalised, cropped to even X, Y) and its LR by the modality's default acquisition model, slices ``z``."""
    volume = read_nifti(path, modality)
    mapping = fit_normalisation(volume, ct_window=tuple(RULES["CT"]["range"]))
    hr, lr = degrade_inplane(mapping.apply(volume.array[:, :, z]), PRESETS[DEFAULT_PRESET[modality]], 2,
                             volume.spacing, np.random.default_rng(seed))
    affine = ScanImage(mapping.apply(volume.array), volume.affine, modality, mapping).cropped(
        (0, 0, z.start or 0), (*volume.array.shape[:2], hr.shape[2])).centre_cropped(hr.shape).affine
    return ScanPair(path.stem, hr, lr, affine, modality, mapping, path.stem)


def train(training: ScanPair, steps: int, folder: Path) -> tuple[Path, Path]:
    """The trained model's checkpoint, and the untrained one's (exactly bicubic interpolation: the baseline run
    through the same ``fedsr infer`` pipeline, intensity mapping included)."""
    rules = {"site": RULES[training.modality]}
    torch.manual_seed(0)
    model = build_model(DEFAULT_MODEL, preset="tiny", scale=2)
    untrained = save_checkpoint(folder / f"{training.modality}_untrained.pt", model, scale=2, normalisation=rules)
    sampler = PatchSampler([training], 2, 48, np.random.default_rng(0))
    stats = train_supervised(model, sampler, steps=steps, batch_size=16, learning_rate=1e-3, loss="l1",
                             device=torch.device("cpu"))
    print(f"  trained {steps} steps on {training.subject} in {stats.seconds:.0f} s (final loss {stats.loss:.4f})")
    return save_checkpoint(folder / f"{training.modality}.pt", model, scale=2, normalisation=rules), untrained


def scores(volume: np.ndarray, hr: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over the kept slices; (X, Y, Z) arrays in [0, 1]."""
    as_batch = lambda v: torch.from_numpy(np.ascontiguousarray(np.moveaxis(v[:, :, keep], 2, 0)[:, None]))  # noqa: E731
    return float(psnr(as_batch(volume), as_batch(hr)).mean()), float(ssim(as_batch(volume), as_batch(hr)).mean())


def infer(checkpoint: Path, lr_file: Path, output: Path, test: ScanPair) -> tuple[np.ndarray, np.ndarray, float]:
    """Run ``fedsr infer``; the output through the HR's intensity mapping, its affine, the command's seconds."""
    start = time.perf_counter()
    subprocess.run([*fedsr_command(), "infer", str(checkpoint), str(lr_file), str(output), "--preview"], check=True,
                   capture_output=True)
    written = nib.load(output)
    return test.normalisation.apply(np.asarray(written.dataobj)), written.affine, time.perf_counter() - start


def case(name: str, training: ScanPair, test: ScanPair, steps: int, folder: Path) -> bool:
    print(f"{name}: test {test.subject} {'x'.join(map(str, test.hr.shape))}")
    trained, untrained = train(training, steps, folder)
    lr_file = folder / f"{name}_lr.nii.gz"
    nib.save(nib.Nifti1Image(test.normalisation.invert(test.lr), test.hr_image().with_voxels(test.lr).affine), lr_file)
    sr, affine, wall = infer(trained, lr_file, folder / f"{name}_sr.nii.gz", test)
    through, _, _ = infer(untrained, lr_file, folder / f"{name}_interpolated.nii.gz", test)
    bicubic = upsample_baseline(torch.from_numpy(np.moveaxis(test.lr, 2, 0)[:, None].copy()), 2)[:, 0].numpy()
    keep = np.flatnonzero(test.hr.max(axis=(0, 1)) > FOREGROUND)
    (sr_psnr, sr_ssim), (in_psnr, in_ssim) = scores(sr, test.hr, keep), scores(through, test.hr, keep)
    bi_psnr, bi_ssim = scores(np.moveaxis(bicubic, 0, 2), test.hr, keep)
    shift = np.abs(affine - test.affine).max()
    print(f"  fedsr infer {wall:.0f} s (with start-up), {len(keep)} slices, output affine vs HR affine: max difference "
          f"{shift:.1e}\n"
          f"  PSNR: SR {sr_psnr:.2f} dB, interpolation through fedsr infer {in_psnr:.2f} "
          f"(gain {sr_psnr - in_psnr:+.2f}), plain bicubic {bi_psnr:.2f}\n"
          f"  SSIM: SR {sr_ssim:.4f}, interpolation through fedsr infer {in_ssim:.4f}, plain bicubic {bi_ssim:.4f}\n"
          f"  preview {folder / f'{name}_sr_preview.png'}")
    return sr_psnr > in_psnr and sr_ssim > in_ssim and shift < 1e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fedsr-infer-quality-"))
    print(f"{DEFAULT_MODEL} tiny x2 in-plane, {args.steps} steps, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    everything = slice(None)
    ct = DATA / "ct" / "ct_brain_atlas_1mm.nii.gz"
    half = nib.load(ct).shape[2] // 2
    results = [
        case("mr", pair(DATA / "mri" / "colin27_t1_1mm.nii.gz", "MR", everything, 0),
             pair(DATA / "mri" / "icbm152_2009a_t1_1mm_brain.nii.gz", "MR", everything, 1), args.steps, folder),
        case("ct", pair(ct, "CT", slice(0, half), 0), pair(ct, "CT", slice(half, None), 1), args.steps, folder),
    ]
    print(f"output beats interpolation (PSNR and SSIM) in {sum(results)} of {len(results)} cases; files in {folder}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
