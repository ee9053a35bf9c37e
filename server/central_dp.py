"""Central (client-level) differential privacy: Flower's DP strategy wrappers around the run's Flower strategy.

The wrapper sits between fedsr's ``server.strategies.SiteStrategy`` and the Flower strategy it holds: every reply
is checked before it is clipped, and only the checked replies are clipped, averaged and noised.

With ``dp = "central"`` the unit of the guarantee is a whole site: each site's update (its weights minus the
round's global weights) is clipped to an L2 norm, and Gaussian noise is added to their average, so that the
released global model hides whether any one site took part. ``dp-clipping`` picks Flower's wrapper:

- ``server-fixed`` / ``client-fixed``: ``DifferentialPrivacy{Server,Client}SideFixedClipping`` with norm
  ``dp-clip-norm``; client-side clipping runs at the site (``client.central_dp.central_clipping_mod``, Flower's
  ``fixedclipping_mod``), so the coordinator never sees an unclipped update;
- ``server-adaptive`` / ``client-adaptive``: ``DifferentialPrivacy{Server,Client}SideAdaptiveClipping`` (Andrew et
  al. 2021), starting from ``dp-clip-norm`` and following the median update norm, privately (the clipped count's
  noise: :func:`clipped_count_stddev`; the epsilon is the noise multiplier's, as Flower's wrapper splits it).

The noise multiplier is ``dp-noise-multiplier``, or planned so that ``num-rounds`` releases spend
``dp-target-epsilon`` at :data:`CENTRAL_DELTA`. The epsilon is that of ``num-rounds`` Gaussian mechanisms, computed
with Opacus' RDP accountant with sampling rate 1: no amplification is claimed, not even with ``fraction-train`` < 1,
whose draw is seeded (the noise is then set for the sites a round samples). Flower's own accountant for the fixed
wrappers only accepts FedAvg itself, not the other strategies a run may choose; the arithmetic is the same. If
sites are missing from a round, or their replies are rejected, the average has fewer terms than the noise was set for
(``num_sampled_clients``): that round's guarantee is weaker, and the log says so.
"""

from __future__ import annotations

import logging

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from server.settings import RunSettings
from shared_models.privacy_accounting import Mechanism, epsilon_of

log = logging.getLogger(__name__)

#: The delta of the client-level guarantee (a run has a handful of sites: far below 1 / sites).
CENTRAL_DELTA = 1e-5

_FIXED = {"server-fixed": DifferentialPrivacyServerSideFixedClipping,
          "client-fixed": DifferentialPrivacyClientSideFixedClipping}
_ADAPTIVE = {"server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
             "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping}


def central_noise_multiplier(settings: RunSettings) -> float:
    """``dp-noise-multiplier``, or the one with which ``num-rounds`` unsampled Gaussian releases spend
    ``dp-target-epsilon`` at :data:`CENTRAL_DELTA` (Opacus' search)."""
    if settings.dp_noise_multiplier:
        return settings.dp_noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=settings.dp_target_epsilon, target_delta=CENTRAL_DELTA,
                                      sample_rate=1.0, steps=settings.num_rounds, accountant="rdp",
                                      epsilon_tolerance=0.01))


def client_level_epsilon(noise_multiplier: float, rounds: int) -> float:
    """Epsilon at :data:`CENTRAL_DELTA` of ``rounds`` Gaussian releases of the clipped average (every site in
    every round: sampling rate 1), from Opacus' RDP accountant."""
    return epsilon_of([Mechanism(noise_multiplier, 1.0, rounds)], CENTRAL_DELTA)


def with_central_dp(strategy: Strategy, settings: RunSettings, sites: int) -> Strategy:
    """``strategy`` wrapped in the Flower DP wrapper ``dp-clipping`` names, for ``sites`` sites per round."""
    sigma = central_noise_multiplier(settings)
    log.info("central DP (%s): noise multiplier %.3f, clipping norm %g, %d sites per round: epsilon %.3f at delta "
             "%g after %d rounds, the site as the unit", settings.dp_clipping, sigma, settings.dp_clip_norm, sites,
             client_level_epsilon(sigma, settings.num_rounds), CENTRAL_DELTA, settings.num_rounds)
    if settings.dp_clipping in _FIXED:
        return _FIXED[settings.dp_clipping](strategy, noise_multiplier=sigma, clipping_norm=settings.dp_clip_norm,
                                            num_sampled_clients=sites)
    return _ADAPTIVE[settings.dp_clipping](strategy, noise_multiplier=sigma, num_sampled_clients=sites,
                                           initial_clipping_norm=settings.dp_clip_norm,
                                           clipped_count_stddev=clipped_count_stddev(sigma, sites))


def clipped_count_stddev(noise_multiplier: float, sites: int) -> float:
    """Noise std on the count of clipped updates (adaptive clipping): Andrew et al.'s sites / 20, but at least the
    noise multiplier, since the update's own noise is (sigma^-2 - (2 std)^-2)^-1/2 and needs 2 std > sigma (a
    federation of a few hospitals is far smaller than the thousands of devices that default was made for)."""
    return max(sites / 20, noise_multiplier)


def central_privacy(settings: RunSettings) -> dict[str, float | str]:
    """What summary.json and the report say of a central-DP run: unit, epsilon, delta, noise, clipping."""
    sigma = central_noise_multiplier(settings)
    return {"unit": "site", "epsilon": client_level_epsilon(sigma, settings.num_rounds), "delta": CENTRAL_DELTA,
            "noise_multiplier": sigma, "clipping": settings.dp_clipping, "clip_norm": settings.dp_clip_norm,
            "rounds": settings.num_rounds}
