"""The CUDA paths: channels-last training (each task, with and without DP), inference and tiled 3D inference on a GPU.

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
def test_channels_last_training_learns_and_keeps_float32_weights(family, dims):
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
    # inference turns TF32 off (shared_models/precision.py): float32 rounding only. With TF32 on, an H100 measured
    # differences up to 3e-4 here; with it off, the tiled 3D forward agreed to 1e-6 of the range
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-5)


def test_tiled_3d_inference_on_the_gpu_matches_the_untiled_cpu_forward():
    torch.manual_seed(0)
    model = build_model("edsr", preset="tiny", scale=2, spatial_dims=3).eval()
    volume = torch.rand(1, 1, 40, 36, 28)
    with torch.no_grad():
        whole = model(volume)
    tiled = tiled_forward(model.cuda(), volume, tile=24, overlap=16, device="cuda")
    assert tiled.device.type == "cpu" and tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, atol=2e-4, rtol=0)


@pytest.mark.parametrize("name, overrides", [("edsr", {}), ("gan", {"gan.warmup-rounds": 0}), ("smore", {})])
@pytest.mark.parametrize("dp", ["none", "local"])
def test_every_task_trains_a_round_on_the_gpu_with_and_without_dp(tmp_path, name, overrides, dp):
    """A whole round of the family's task on CUDA (the path a site takes with ``--device auto`` on a GPU): the
    GAN's two networks, the self-supervised family on thick scans, DP-SGD's per-patient clipping and noise drawn
    on the GPU; the weights change and stay finite float32."""
    from client.tasks import task_for
    from client.tasks.base import RoundJob
    from conftest import make_thick_site
    from server.settings import RunSettings
    from shared_models.registry import build_from_settings
    from simulation.phantoms import write_phantom_sites

    (folder,) = write_phantom_sites(tmp_path, n_sites=1, subjects_per_site=5, shape=(48, 48, 32))
    if name == "smore":
        make_thick_site(folder, scale=2)
    base = RunSettings(model=name, patch_size=32, batch_size=8, local_steps=5, num_rounds=2, dp=dp).to_config()
    settings = RunSettings.from_run_config({**base, **overrides})
    job = RoundJob.from_config({**settings.round_config(), "server-round": 1}, torch.device("cuda"))
    task = task_for(name)
    site = task.prepare(str(folder), job)
    torch.manual_seed(0)
    model = build_from_settings(job)
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    metrics = task.train(model, {k: v.clone() for k, v in before.items()}, site, job).metrics
    after = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(v.dtype == before[k].dtype and bool(torch.isfinite(v.float()).all()) for k, v in after.items())
    assert all(np.isfinite(float(value)) for key, value in metrics.items() if key.startswith("train-loss"))
    if dp == "local":
        assert metrics["dp-epsilon"] > 0


def test_per_patient_dp_gradients_on_the_gpu_match_the_cpu():
    """Opacus' per-sample gradients, averaged per patient, on CUDA equal the same computation on the CPU."""
    from client.privacy import PrivacyPlan, PrivateGradient, unit_rows
    from shared_models.losses import loss_from_spec

    torch.manual_seed(0)
    model = build_model("edsr", preset="tiny", scale=2, spatial_dims=2)
    pairs = _Pairs(2)
    lr, hr = pairs.batch(6)
    plan = PrivacyPlan(unit="patient", units=3, per_unit=2, sample_rate=0.5, noise_multiplier=0.0, clip_norm=1.0,
                       steps=1, delta=1e-5)
    grads = {}
    for device in ("cpu", "cuda"):
        copy = build_model("edsr", preset="tiny", scale=2, spatial_dims=2)
        copy.load_state_dict(model.state_dict())
        copy.to(device)
        private = PrivateGradient(copy, plan, torch.Generator(device=device))
        criterion = loss_from_spec("l1")
        x, y = lr.to(device), hr.to(device)
        grads[device], _ = private.unit_gradients(lambda module: criterion(module(x), y), unit_rows(3, 2), 3)
        private.close()
    for on_cpu, on_gpu in zip(grads["cpu"], grads["cuda"]):
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-5)
