"""A federation on real scans: site folders cut from the public volumes in ``../shared/data``.

Three sites, each a real volume cut into four axial slabs (the "subjects": two train, one val, one test, so
that validation anatomy is never seen in training), each with a different scanner profile:

- ``colin27-3t``: Colin27 T1 (MR), plain k-space truncation, low noise;
- ``icbm152-1.5t``: ICBM152 2009a T1 template (MR), 1.5T-like k-space, 2 mm slice profile, more noise;
- ``ct-atlas``: CT brain atlas (HU, brain window), Gaussian PSF and Poisson-like noise.

Then runs ``fedsr simulate --sites-dir`` on them and prints each site's gain over bicubic.

    python benchmarks/real_sites.py [--data ../shared/data] [extra fedsr simulate flags ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from bench_common import simulate_and_report

SLAB = 24  # slices per slab ("subject")
SITES = {
    "colin27-3t": ("mri/colin27_t1_1mm.nii.gz", "MR", 'profile = "mr-3t-kspace"', ""),
    "icbm152-1.5t": ("mri/icbm152_2009a_t1_1mm_brain.nii.gz", "MR", 'profile = "mr-1.5t-kspace"', ""),
    "ct-atlas": ("ct/ct_brain_atlas_1mm.nii.gz", "CT", 'profile = "ct-standard"',
                 "[normalisation]\nct_window = [0.0, 80.0]  # the clinical brain window (W80 L40)\n"),
}


def write_real_sites(data: Path, out: Path) -> Path:
    """Cut each real volume into four axial slabs through the brain and write them as a site folder."""
    for name, (relative, modality, acquisition, extra) in SITES.items():
        image = nib.as_closest_canonical(nib.load(data / relative))
        volume = np.asarray(image.dataobj, dtype=np.float32)
        middle = volume.shape[2] // 2
        starts = [middle - 2 * SLAB - 6, middle - SLAB - 2, middle + 2, middle + SLAB + 6]
        site = out / name
        site.mkdir(parents=True, exist_ok=True)
        for i, start in enumerate(starts):
            affine = image.affine.copy()
            affine[:3, 3] = image.affine[:3, :3] @ np.array([0, 0, start]) + image.affine[:3, 3]
            nib.save(nib.Nifti1Image(volume[:, :, start : start + SLAB], affine), site / f"slab-{i}.nii.gz")
        (site / "site.toml").write_text(
            f'name = "{name}"\nmodality = "{modality}"\n'
            "share_local_model = true  # public volumes: the local-only model and example crops may leave the site\n"
            "share_previews = true\n\n"
            f"[acquisition]\n{acquisition}\n\n"
            f'[split]\nval = ["slab-2"]\ntest = ["slab-0"]\n\n{extra}'
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args, extra = parser.parse_known_args()
    sites = write_real_sites(args.data, Path(tempfile.mkdtemp(prefix="fedsr-real-")) / "sites")
    return simulate_and_report(["--sites-dir", str(sites), *extra])


if __name__ == "__main__":
    raise SystemExit(main())
