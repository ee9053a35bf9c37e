"""Choosing the torch device a site trains on."""

from __future__ import annotations

import contextlib

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


def mixed_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA (no loss scaling needed, unlike float16); full float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device, ndim: int) -> torch.memory_format:
    """Channels-last on CUDA (faster convolutions on tensor cores), the default layout on the CPU.

    ``ndim``: dimensions of the batches (4 for 2D images, 5 for volumes).
    """
    if device.type != "cuda":
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d
