"""The CUDA paths: bfloat16 autocast and channels-last training, inference and tiled 3D inference on a GPU.

Skipped where no CUDA GPU is visible (this project's development machines and CI have none); run them on a GPU
machine with ``python benchmarks/gpu_check.py`` (or ``pytest -m cuda``). Each compares the GPU result with the same
computation on the CPU, so a wrong layout or precision shows as a difference, not just as "it ran".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.device import memory_format, resolve_device
from client.training import train_supervised
from shared_models.inference import super_resolve, tiled_forward
from shared_models.registry import build_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py)"),
]


class _Pairs:
    """A fixed batch of aligned LR/HR patches, smooth noise (the sampler interface of client.training)."""

    def __init__(self, dims: int, seed: int = 0) -> None:
        pool = torch.nn.functional.avg_pool2d if dims == 2 else torch.nn.functional.avg_pool3d
        noise = torch.rand((8, 1, *(32,) * dims), generator=torch.Generator().manual_seed(seed))
        self.hr = pool(noise, 3, 1, 1)
        self.lr = pool(self.hr, 2)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lr[:size], self.hr[:size]


def test_auto_picks_the_gpu():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("family, dims", [("edsr", 2), ("edsr", 3), ("swinir", 2), ("srcnn", 2)])
def test_bf16_channels_last_training_learns_and_keeps_float32_weights(family, dims):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(family, preset="tiny", scale=2, **({"spatial_dims": dims} if family != "swinir" else {}))
    pairs = _Pairs(dims)
    first = train_supervised(model, pairs, steps=1, batch_size=4, learning_rate=1e-3, loss="l1", device=device)
    later = train_supervised(model, pairs, steps=60, batch_size=4, learning_rate=1e-3, loss="l1", device=device)
    assert np.isfinite(later.loss) and later.loss < first.loss
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())
    assert memory_format(device, 4 if dims == 2 else 5) in (torch.channels_last, torch.channels_last_3d)


@pytest.mark.parametrize("family, params", [("edsr", {}), ("swinir", {}), ("smore", {})])
def test_gpu_inference_matches_the_cpu(family, params):
    torch.manual_seed(0)
    model = build_model(family, preset="tiny", scale=2, **params)
    with torch.no_grad():  # weights away from the initial ones, whose output is plain interpolation
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    volume = np.random.default_rng(0).random((40, 36, 6), dtype=np.float32)
    on_cpu = super_resolve(model, volume, device="cpu")
    on_gpu = super_resolve(model, volume, device="cuda")
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-4)


def test_tiled_3d_inference_on_the_gpu_matches_the_untiled_cpu_forward():
    torch.manual_seed(0)
    model = build_model("edsr", preset="tiny", scale=2, spatial_dims=3).eval()
    volume = torch.rand(1, 1, 40, 36, 28)
    with torch.no_grad():
        whole = model(volume)
    tiled = tiled_forward(model.cuda(), volume, tile=24, overlap=16, device="cuda")
    assert tiled.device.type == "cpu" and tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, atol=2e-4, rtol=0)
