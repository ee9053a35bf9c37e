"""Choosing the torch device a site trains on, and the tensor layout there.

On CUDA, training runs in float32 (cuDNN convolutions use TF32 tensor cores, PyTorch's default) with channels-last
tensors. bfloat16 autocast is not used: on an H100 it ran the tiny and base residual CNNs in 2D and 3D at 0.74-0.87x
the float32 speed in two runs (``python benchmarks/gpu_check.py``, README "Measured numbers"); the convolutions are
too small for halved precision to pay for autocast's casts.
"""

from __future__ import annotations

import torch


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` into a torch device.

    ``auto`` picks CUDA when a GPU is visible and the CPU otherwise. Asking for CUDA on a machine without it
    is an error rather than a silent fall-back, so that a site never trains 50x slower than it believes.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} was asked for but no CUDA GPU is visible; use --device auto or cpu")
    return device


def memory_format(device: torch.device, ndim: int) -> torch.memory_format:
    """Channels-last on CUDA (on an H100, 1.05-1.28x the contiguous float32 speed for the base residual CNN in 2D
    and 3D over two runs, 0.89-1.16x for the tiny one), the default layout on the CPU.

    ``ndim``: dimensions of the batches (4 for 2D images, 5 for volumes).
    """
    if device.type != "cuda":
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d
