"""Differential-privacy accounting shared by the sites (local DP-SGD, client/privacy.py) and the coordinator
(central DP, server/central_dp.py): a Gaussian mechanism's parameters and the epsilon of running several, with
Opacus' RDP accountant (RDP composes over any sequence of mechanisms and converts to (epsilon, delta) at the end).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Mechanism:
    """``steps`` releases of a Gaussian mechanism (DP-SGD steps, or rounds of central DP) with noise of std
    ``noise_multiplier`` x the clipping norm, each including every privacy unit independently with probability
    ``sample_rate`` (Poisson sampling; 1: every unit every time)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_opacus(self) -> tuple[float, float, int]:
        """The (noise multiplier, sample rate, steps) triple of an Opacus accountant's history."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def epsilon_of(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """Epsilon at ``delta`` of running ``mechanisms`` one after another (Opacus' RDP accountant); 0 for none."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [m.as_opacus() for m in mechanisms if m.steps > 0]
    return float(accountant.get_epsilon(delta=delta)) if accountant.history else 0.0
