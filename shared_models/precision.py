"""Exact float32 for inference on CUDA (why: shared_models/inference.py's module docstring)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """CUDA convolutions and matrix products in IEEE float32 (TF32 off) inside the block; the flags as they were
    after it. No effect on the CPU, which has no TF32. The flags are process-wide: a training step on another
    thread during the block also runs without TF32 (slower, not wrong)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
