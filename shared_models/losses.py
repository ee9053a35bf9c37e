"""Training losses for SR, combined by weight: ``build_loss({"l1": 1.0, "ssim": 0.1})``.

Every term maps (SR, HR) of shape (B, C, H, W) or (B, C, D, H, W) to a scalar (mean over the batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from torch import nn

from shared_models.metrics import DATA_RANGE, SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_WINDOW, laplacian_of_gaussian


class CharbonnierLoss(nn.Module):
    """mean(sqrt((SR - HR)^2 + eps^2)): a smooth L1 (Lai et al., LapSRN)."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((sr - hr) ** 2 + self.eps**2).mean()


class SSIMTermLoss(nn.Module):
    """1 - SSIM with the metric's settings (MONAI ``SSIMLoss``); spatial dims taken from the input.
    Patches must be >= 11 along every spatial axis."""

    def __init__(self) -> None:
        super().__init__()
        self._by_dims = nn.ModuleDict(
            {
                str(dims): SSIMLoss(
                    spatial_dims=dims,
                    data_range=DATA_RANGE,
                    kernel_type="gaussian",
                    win_size=SSIM_WINDOW,
                    kernel_sigma=SSIM_SIGMA,
                    k1=SSIM_K1,
                    k2=SSIM_K2,
                )
                for dims in (2, 3)
            }
        )

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return self._by_dims[str(sr.ndim - 2)](sr, hr)


class HFENLoss(nn.Module):
    """L1 between the Laplacian-of-Gaussian (sigma 1.5) responses of SR and HR.

    Unlike the HFEN metric it is not divided by ||LoG(HR)||, which is ~0 on flat background patches.
    """

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(laplacian_of_gaussian(sr), laplacian_of_gaussian(hr))


class FFTLoss(nn.Module):
    """Mean modulus of the difference of the orthonormal spatial FFTs of SR and HR (penalises lost detail)."""

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, sr.ndim))
        return (torch.fft.rfftn(sr, dim=dims, norm="ortho") - torch.fft.rfftn(hr, dim=dims, norm="ortho")).abs().mean()


LOSS_TERMS: dict[str, type[nn.Module]] = {
    "l1": nn.L1Loss,
    "mse": nn.MSELoss,
    "charbonnier": CharbonnierLoss,
    "ssim": SSIMTermLoss,
    "hfen": HFENLoss,
    "fft": FFTLoss,
}


class CombinedLoss(nn.Module):
    """Weighted sum of named loss terms; ``components`` gives the unweighted terms for logging."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.terms = nn.ModuleDict({name: LOSS_TERMS[name]() for name in self.weights})

    def components(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted value of every term, scalar tensors."""
        if sr.shape != hr.shape:
            raise ValueError(f"SR and HR shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
        return {name: term(sr, hr) for name, term in self.terms.items()}

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """sum_k weight_k * term_k(SR, HR), a scalar tensor."""
        return sum(self.weights[name] * value for name, value in self.components(sr, hr).items())


def build_loss(weights: Mapping[str, float]) -> CombinedLoss:
    """Loss from ``{term: weight}``; terms: see ``LOSS_TERMS``. Zero-weight terms are dropped.

    Raises:
        ValueError: unknown term (lists the known ones), negative/non-finite weight, or no positive weight.
    """
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss term(s) {', '.join(unknown)}; known: {', '.join(LOSS_TERMS)}")
    bad = {name: w for name, w in weights.items() if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"loss weights must be finite numbers >= 0, got {bad}")
    active = {name: float(w) for name, w in weights.items() if w > 0}
    if not active:
        raise ValueError(f"loss needs at least one positive weight, got {dict(weights)}")
    return CombinedLoss(active)


def parse_loss(spec: str) -> dict[str, float]:
    """``"l1"`` or ``"l1:1.0,ssim:0.1"`` -> {name: weight} (the ``loss`` run setting)."""
    weights: dict[str, float] = {}
    for term in filter(None, (t.strip() for t in spec.split(","))):
        name, _, weight = term.partition(":")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"loss term {term!r}: the weight after ':' must be a number") from None
    if not weights:
        raise ValueError(f"empty loss specification {spec!r}")
    return weights


def loss_from_spec(spec: str) -> CombinedLoss:
    """The loss a ``loss`` run setting names; ValueError naming an unknown term or a bad weight."""
    return build_loss(parse_loss(spec))


# ------------------------------------------------------------------------------------------ adversarial terms
# These take discriminator logits, not (SR, HR), so they are not in LOSS_TERMS. Logits may be patch maps
# (B, 1, h, w); "E[...]" is the mean over every logit of the batch. Computed with BCE-with-logits (stable).


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def relativistic_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """ESRGAN's relativistic average discriminator loss (Jolicoeur-Martineau, 2018; Wang et al., 2018):

    ``(BCE(C(real) - E[C(fake)], 1) + BCE(C(fake) - E[C(real)], 0)) / 2``: real images should look more real
    than the average fake, fakes less real than the average real. Pass ``fake_logits`` of detached SR images.
    """
    return 0.5 * (_bce(real_logits - fake_logits.mean(), 1.0) + _bce(fake_logits - real_logits.mean(), 0.0))


def relativistic_generator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """ESRGAN's relativistic average generator loss, the discriminator's with the targets swapped:

    ``(BCE(C(real) - E[C(fake)], 0) + BCE(C(fake) - E[C(real)], 1)) / 2``; the generator gets gradients from
    both the real and the fake term. ``real_logits`` may be detached (as in ESRGAN).
    """
    return 0.5 * (_bce(real_logits - fake_logits.mean(), 0.0) + _bce(fake_logits - real_logits.mean(), 1.0))


def nonsaturating_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Standard GAN discriminator loss: ``BCE(C(real), 1) + BCE(C(fake), 0)`` (Goodfellow et al., 2014)."""
    return _bce(real_logits, 1.0) + _bce(fake_logits, 0.0)


def nonsaturating_generator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``BCE(C(fake), 1)``; ``real_logits`` is unused (same signature)."""
    del real_logits
    return _bce(fake_logits, 1.0)


#: name -> (generator loss, discriminator loss), each ``f(real_logits, fake_logits) -> scalar``.
ADVERSARIAL_LOSSES = {
    "relativistic": (relativistic_generator_loss, relativistic_discriminator_loss),
    "nonsaturating": (nonsaturating_generator_loss, nonsaturating_discriminator_loss),
}
