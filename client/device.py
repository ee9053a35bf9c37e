"""Choosing the torch device a site trains on."""

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
