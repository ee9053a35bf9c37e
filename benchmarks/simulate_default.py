"""The README's first command, measured: default ``fedsr simulate`` wall time and each site's PSNR gain.

Runs ``fedsr simulate`` with its defaults (3 phantom sites) in a temporary run folder, then prints the end-to-end
wall time (phantom generation and Ray start-up included) and, per site, the final global model's PSNR and SSIM
beside the bicubic baseline of the same LR input on that site's validation scans.

    python benchmarks/simulate_default.py [--sites-dir DIR] [extra fedsr simulate flags ...]
"""

from __future__ import annotations

import sys

from bench_common import simulate_and_report

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    sys.exit(simulate_and_report(sys.argv[1:]))
