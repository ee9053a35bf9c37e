"""Device choice: CUDA when asked for and present, float32 and the default layout on the CPU."""

import pytest
import torch

from client.device import memory_format, mixed_precision, resolve_device


def test_auto_picks_the_cpu_without_a_gpu_and_cuda_is_refused_clearly():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
            resolve_device("cuda")


def test_cpu_training_stays_float32_in_the_default_layout():
    cpu = torch.device("cpu")
    layer = torch.nn.Conv2d(1, 2, 3)
    with mixed_precision(cpu):
        out = layer(torch.rand(1, 1, 8, 8))
    assert out.dtype == torch.float32
    assert memory_format(cpu, 4) == memory_format(cpu, 5) == torch.contiguous_format


def test_cuda_gets_channels_last_for_images_and_volumes():
    cuda = torch.device("cuda")
    assert memory_format(cuda, 4) == torch.channels_last
    assert memory_format(cuda, 5) == torch.channels_last_3d
