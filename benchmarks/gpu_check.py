"""One short, prepared check for a lent GPU machine (minutes, not hours): the CUDA tests, a short federation on CUDA,
and training throughput with fedsr's CUDA path (bfloat16 autocast, channels-last) against a plain float32 PyTorch
loop of the same model, sampler and steps, measured in the same run.

    python benchmarks/gpu_check.py [--steps 200] [--skip-federation]

Refuses to start without a visible CUDA GPU. Exits non-zero when the tests or the federation fail.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import fedsr_command
from client.training import PatchSampler, train_supervised
from shared_models.registry import build_model
from simulation.phantoms import write_phantom_sites

ROOT = Path(__file__).resolve().parents[1]


def run_tests() -> int:
    """The CUDA-marked tests and the device tests, as pytest prints them."""
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py", "tests/test_device.py"]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


def run_federation(root: Path) -> int:
    """``fedsr simulate --device cuda`` for 2 short rounds; prints the wall time and each site's gain."""
    run_dir = root / "run"
    command = [*fedsr_command(), "simulate", "--device", "cuda", "--rounds", "2", "--local-steps", "20",
               "--run-dir", str(run_dir)]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, cwd=root).returncode
    print(f"federation on CUDA: exit {code}, {time.perf_counter() - start:.1f} s end to end", flush=True)
    summary = run_dir / "summary.json"
    if code == 0 and summary.exists():
        for site, m in json.loads(summary.read_text())["sites"].items():
            print(f"  {site:<24} PSNR {m['psnr']:.2f} dB, gain over {m.get('baseline', 'baseline')} "
                  f"{m['psnr'] - m['baseline-psnr']:+.2f} dB")
    return code


def plain_loop(model: torch.nn.Module, sampler: PatchSampler, steps: int, batch: int) -> float:
    """patches/s of a hand-written float32 loop on the GPU (contiguous tensors, L1, Adam)."""
    device = torch.device("cuda")
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        lr, hr = sampler.batch(batch)
        loss = torch.nn.functional.l1_loss(model(lr.to(device)), hr.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def throughput(root: Path, steps: int) -> None:
    """fedsr's CUDA training path vs the plain loop, 2D and 3D EDSR tiny, on one phantom site's scans."""
    from client.paired import paired_for
    from client.pairs import prepare_site

    (site_dir,) = write_phantom_sites(root / "sites-throughput", n_sites=1)
    for dims, patch, batch in ((2, 48, 16), (3, 32, 4)):
        site = prepare_site(str(site_dir), 2, paired_for(dims))
        rates = {}
        for name in ("plain", "fedsr"):
            torch.manual_seed(0)
            model = build_model("edsr", preset="tiny", scale=2, spatial_dims=dims)
            sampler = site.pairing.sampler(site.train, 2, patch, np.random.default_rng(0))
            if name == "plain":
                rates[name] = plain_loop(model, sampler, steps, batch)
            else:
                stats = train_supervised(model, sampler, steps=steps, batch_size=batch, learning_rate=1e-3,
                                         loss="l1", device=torch.device("cuda"))
                rates[name] = stats.patches / stats.seconds
        print(f"  edsr tiny {dims}D, batch {batch}: plain float32 {rates['plain']:8.1f} patches/s, fedsr "
              f"(bf16 autocast, channels-last) {rates['fedsr']:8.1f} patches/s, ratio {rates['fedsr'] / rates['plain']:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="Training steps per throughput measurement.")
    parser.add_argument("--skip-federation", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible: run this on a GPU machine", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="fedsr-gpu-check-"))
    failures = run_tests()
    if not args.skip_federation:
        failures += run_federation(root)
    print("training throughput on CUDA:", flush=True)
    throughput(root, args.steps)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
