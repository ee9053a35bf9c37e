"""client.training.train_supervised: the loss is checked for NaN/Inf every FINITE_CHECK_EVERY steps and at the end
(one wait for the GPU per check, not per step), and a diverged run stops at the next check."""

from __future__ import annotations

import pytest
import torch

from client.training import FINITE_CHECK_EVERY, train_supervised
from shared_models.registry import build_model


class _Patches:
    """Smooth random 2D patches; from step ``nan_from`` on (0-based) the LR batch is NaN. Counts its batches."""

    def __init__(self, nan_from: int | None = None) -> None:
        self.nan_from, self.calls = nan_from, 0
        hr = torch.nn.functional.avg_pool2d(torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
                                            3, 1, 1)
        self.hr, self.lr = hr, torch.nn.functional.avg_pool2d(hr, 2)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr = self.lr[:size].clone()
        if self.nan_from is not None and self.calls >= self.nan_from:
            lr.fill_(float("nan"))
        self.calls += 1
        return lr, self.hr[:size]


def _train(sampler: _Patches, steps: int):
    torch.manual_seed(0)
    model = build_model("edsr", preset="tiny", scale=2, spatial_dims=2)
    return train_supervised(model, sampler, steps=steps, batch_size=4, learning_rate=1e-3, loss="l1",
                            device=torch.device("cpu"))


def test_a_diverged_loss_stops_training_at_the_next_check():
    sampler = _Patches(nan_from=3)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        _train(sampler, steps=3 * FINITE_CHECK_EVERY)
    assert sampler.calls == FINITE_CHECK_EVERY  # stopped at the first check, not after all the steps


def test_a_nan_in_the_last_steps_is_caught_before_returning():
    steps = FINITE_CHECK_EVERY + 3
    with pytest.raises(FloatingPointError):
        _train(_Patches(nan_from=steps - 1), steps=steps)


def test_a_finite_run_returns_its_tail_loss():
    stats = _train(_Patches(), steps=FINITE_CHECK_EVERY + 3)
    assert 0 < stats.loss < 1 and stats.patches == 4 * (FINITE_CHECK_EVERY + 3)
