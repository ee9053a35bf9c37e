"""One short, prepared check for a lent GPU machine (minutes, not hours): the CUDA tests, a short federation on CUDA
(``fedsr simulate`` where Ray is installed, else ``fedsr deploy local``: SuperLink + SuperNodes with TLS and
authentication), ``fedsr infer`` of a 3D model with the tile and batch chosen from the GPU's free memory against the
same command on the CPU (and the same tiled forward with cuDNN's TF32 on and off), and training throughput with
fedsr's CUDA path (float32, channels-last) against plain PyTorch loops in float32 and bfloat16 autocast, contiguous
and channels-last, of the same model, sampler and steps, measured in the same run.

    python benchmarks/gpu_check.py [--steps 100] [--skip-federation]

Refuses to start without a visible CUDA GPU. Exits non-zero when the tests or the federation fail.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import fedsr_command
from client.device import memory_format
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
    """A 2-round federation of 2 sites on the GPU; prints the wall time and each site's gain. ``fedsr simulate
    --device cuda`` needs Ray (the ``simulation`` extra, too large to carry to some GPU machines); without it the
    deployment engine runs the same federation, its SuperNodes on ``--device auto``."""
    run_dir = root / "run"
    if importlib.util.find_spec("ray") is not None:
        command = [*fedsr_command(), "simulate", "--device", "cuda", "--rounds", "2", "--local-steps", "20",
                   "--sites", "2", "--run-dir", str(run_dir)]
    else:
        command = [*fedsr_command(), "deploy", "local", "--sites", "2", "--run-dir", str(run_dir),
                   "--run-config", "num-rounds=2 local-steps=20"]
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


def infer_check(root: Path) -> int:
    """``fedsr infer`` of a 3D EDSR (weights moved off their start) on a phantom scan: on the GPU with the tile and
    batch planned from its free memory (timed), and with ``--tile 32`` on the GPU and on the CPU, which must agree
    (tiling is exact only within the model's reach, so only equal tiles are compared)."""
    import nibabel as nib

    from shared_models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("edsr", preset="tiny", scale=2, spatial_dims=3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    rules = {"site-a": {"modality": "MR", "kind": "mr-percentile", "range": [0.5, 99.5]}}
    checkpoint = save_checkpoint(root / "edsr3d.pt", model, scale=2, normalisation=rules)
    (site_dir,) = write_phantom_sites(root / "sites-infer", n_sites=1, subjects_per_site=1)
    scan = next(site_dir.glob("*.nii.gz"))
    code = 0
    for name, device, extra in (("planned", "cuda", []), ("cuda-32", "cuda", ["--tile", "32"]),
                                ("cpu-32", "cpu", ["--tile", "32"])):
        command = [*fedsr_command(), "infer", str(checkpoint), str(scan), str(root / f"infer-{name}.nii.gz"),
                   "--device", device, *extra]
        print("$", " ".join(command), flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        print(done.stdout[-1200:], done.stderr[-1200:], f"exit {done.returncode}, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        code |= done.returncode
    if code == 0:
        gpu, cpu = (np.asarray(nib.load(root / f"infer-{n}.nii.gz").dataobj, dtype=np.float64)
                    for n in ("cuda-32", "cpu-32"))
        worst = float(np.abs(gpu - cpu).max()) / max(1e-9, float(cpu.max() - cpu.min()))
        print(f"infer 3D, tile 32: GPU vs CPU largest difference {worst:.2e} of the range (the int16 output's unit "
              f"is {1 / (cpu.max() - cpu.min()):.1e})", flush=True)
        code = int(worst > 2.5 / (cpu.max() - cpu.min()))  # a rounding flip of a unit or two, not TF32's 44 units
    return code | tf32_check(model)


def tf32_check(model: torch.nn.Module) -> int:
    """The tiled 3D forward of ``model`` on the GPU with cuDNN's TF32 allowed process-wide (PyTorch's default, as
    training leaves it) and not, against the CPU: the largest and the 99.9th-percentile difference, in units of the
    output's range. Inference turns TF32 off itself (shared_models/precision.py), so both must agree with the CPU
    to 1e-4 of the range (an H100 measured 5e-4 with TF32 on, 1e-6 off, before inference did so)."""
    from shared_models.inference import tiled_forward

    volume = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 40, 36, 28, generator=torch.Generator().manual_seed(0)),
                                            3, 1, 1)
    model = model.eval()
    with torch.no_grad():
        on_cpu = tiled_forward(model.cpu(), volume, tile=24, overlap=16, device="cpu")
    span = float(on_cpu.max() - on_cpu.min())
    found, worst = torch.backends.cudnn.allow_tf32, {}
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        with torch.no_grad():
            on_gpu = tiled_forward(model.cuda(), volume, tile=24, overlap=16, device="cuda")
        difference = (on_gpu - on_cpu).abs().flatten() / span
        worst[tf32] = float(difference.max())
        high = float(difference.kthvalue(int(0.999 * difference.numel())).values)
        print(f"tiled 3D forward, GPU (TF32 {'allowed' if tf32 else 'off'} process-wide) vs CPU: largest difference "
              f"{worst[tf32]:.2e}, 99.9th percentile {high:.2e} of the range", flush=True)
    torch.backends.cudnn.allow_tf32 = found
    return int(max(worst.values()) > 1e-4)


def plain_loop(model: torch.nn.Module, sampler: PatchSampler, steps: int, batch: int, *, dims: int, bf16: bool,
               channels_last: bool) -> float:
    """patches/s of a hand-written loop on the GPU (L1, Adam) in the given precision and layout, after 10 warm-up
    steps (cuDNN's algorithm choice)."""
    device = torch.device("cuda")
    layout = memory_format(device, dims + 2) if channels_last else torch.contiguous_format
    model.to(device, memory_format=layout).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        lr, hr = sampler.batch(batch)
        with precision:
            output = model(lr.to(device, memory_format=layout))
        loss = torch.nn.functional.l1_loss(output.float(), hr.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def throughput(root: Path, steps: int) -> None:
    """fedsr's CUDA training path (float32, channels-last) against plain loops in each precision and layout,
    2D and 3D EDSR, tiny and base presets, on one phantom site's scans. Ratios are to the float32 contiguous loop."""
    from client.paired import paired_for
    from client.pairs import prepare_site

    (site_dir,) = write_phantom_sites(root / "sites-throughput", n_sites=1)
    variants = {"fp32": (False, False), "fp32+CL": (False, True), "bf16": (True, False), "bf16+CL": (True, True)}
    for dims, patch, batch in ((2, 48, 16), (3, 32, 4)):
        site = prepare_site(str(site_dir), 2, paired_for(dims))
        for preset in ("tiny", "base"):
            rates = {}
            for name in (*variants, "fedsr"):
                torch.manual_seed(0)
                model = build_model("edsr", preset=preset, scale=2, spatial_dims=dims)
                sampler = site.pairing.sampler(site.train, 2, patch, np.random.default_rng(0))
                if name == "fedsr":
                    train_supervised(model, sampler, steps=10, batch_size=batch, learning_rate=1e-3, loss="l1",
                                     device=torch.device("cuda"))  # warm-up, as the plain loops have
                    stats = train_supervised(model, sampler, steps=steps, batch_size=batch, learning_rate=1e-3,
                                             loss="l1", device=torch.device("cuda"))
                    rates[name] = stats.patches / stats.seconds
                else:
                    bf16, channels_last = variants[name]
                    rates[name] = plain_loop(model, sampler, steps, batch, dims=dims, bf16=bf16,
                                             channels_last=channels_last)
            peak = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            cells = ", ".join(f"{name} {rate:7.1f} ({rate / rates['fp32']:.2f})" for name, rate in rates.items())
            print(f"  edsr {preset} {dims}D, batch {batch}, patches/s (x fp32): {cells}; peak GPU memory "
                  f"{peak:.0f} MiB", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="Training steps per throughput measurement.")
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
    failures += infer_check(root)
    print("training throughput on CUDA:", flush=True)
    throughput(root, args.steps)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
