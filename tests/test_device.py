"""Device choice: CUDA when asked for and present, float32 and the default layout on the CPU."""

import pytest
import torch

from client.device import memory_format, resolve_device


def test_auto_picks_the_cpu_without_a_gpu_and_cuda_is_refused_clearly():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
            resolve_device("cuda")


def test_cpu_training_keeps_the_default_layout():
    cpu = torch.device("cpu")
    assert memory_format(cpu, 4) == memory_format(cpu, 5) == torch.contiguous_format


def test_cuda_gets_channels_last_for_images_and_volumes():
    cuda = torch.device("cuda")
    assert memory_format(cuda, 4) == torch.channels_last
    assert memory_format(cuda, 5) == torch.channels_last_3d


class _FlagRecorder(torch.nn.Module):
    """x2 nearest-neighbour upsampling that records CUDA's TF32 flags as each forward pass sees them."""

    def __init__(self, scale_along: tuple[int, ...]) -> None:
        super().__init__()
        self.scale_along, self.seen = scale_along, []
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the device inference moves the model to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        for axis in self.scale_along:
            x = x.repeat_interleave(2, dim=axis)
        return x


@pytest.fixture
def tf32_on():
    """TF32 allowed for convolutions and matrix products during the test, the flags restored after it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("path", ["2d-slices", "3d-tiles", "through-plane"])
def test_inference_runs_without_tf32_and_restores_the_flags(path, monkeypatch, tf32_on):
    """Every inference path turns TF32 off for its forward passes (GPU output = CPU output to float rounding) and
    leaves the process's flags as they were (training keeps TF32)."""
    from shared_models import inference
    from shared_models.smore import super_resolve_through_plane

    volume = torch.rand(12, 10, 6).numpy()
    if path == "2d-slices":
        model = _FlagRecorder((2, 3))
        out = inference.super_resolve(model, volume)
    elif path == "3d-tiles":
        model = _FlagRecorder((2, 3, 4))
        monkeypatch.setattr(inference, "model_spatial_dims", lambda _model: 3)
        out = inference.super_resolve(model, volume, tile=8, overlap=4)
    else:
        model = _FlagRecorder((3,))
        out = super_resolve_through_plane(model, volume)
    assert out.size and model.seen and set(model.seen) == {(False, False)}
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
