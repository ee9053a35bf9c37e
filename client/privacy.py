"""Differential privacy at a site: DP-SGD with the patient as the privacy unit, planned and accounted for.

A DP round at a site (``dp = "local"``):

1. :func:`plan_round`: the privacy units of the training split (patients; tiles with ``dp-unit = "patch"``), the
   sampling rate q (expected units per step / units) and the noise multiplier sigma: given
   (``dp-noise-multiplier``), or planned with Opacus' ``get_noise_multiplier`` so that the whole planned training,
   ``num-rounds`` x ``local-steps`` steps, spends ``dp-target-epsilon`` at the site's delta: not per round.
2. :func:`check_budget`: the site's ledger plus this round against its ``[privacy] epsilon_budget``; a round that
   would pass it is refused beforehand (:class:`client.policy.SiteRefusal`, category ``privacy-budget``).
3. :func:`train_private`: every step includes each unit independently with probability q (Poisson sampling, from
   the operating system's entropy), draws ``dp-patches-per-patient`` patches from each included patient, takes
   per-patch gradients (Opacus' ``GradSampleModule``), averages them per unit, clips each unit's gradient to norm
   C, adds N(0, (sigma C)^2) noise to their sum and divides by the expected number of units q N (Opacus' "mean"
   convention); Adam then steps on that gradient (post-processing: no further privacy cost).
4. :func:`record_spend`: the mechanism goes into the site's ledger (:mod:`client.privacy_ledger`) before the
   weights leave the site, so a crash after it over-counts and never under-counts.

Why our own step and not Opacus' ``PrivacyEngine``/``DPOptimizer``: those clip each *sample* (one patch of a
batch) and their Poisson loader samples dataset items; here one unit is a patient with several patches in a step,
which must share one clipping bound (user-level DP). Per-sample gradients, the accountant and the noise planning
are Opacus'. Opacus 1.6 computes wrong per-sample gradients for channels-last Conv2d inputs, so DP training keeps
the default memory layout (and float32) on every device.

What DP covers: the weights (and training metrics) that leave the site. Validation and test scores are computed
on patients who are not trained on and leave as plain numbers.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from client.privacy_ledger import Mechanism, PrivacyLedger, Spend
from client.training import FOREGROUND_LEVEL
from shared_models.losses import loss_from_spec
from shared_models.settings import PATCH_UNIT_WARNING

if TYPE_CHECKING:
    from client.pairs import PreparedSite, ScanPair
    from client.tasks.base import RoundJob

log = logging.getLogger(__name__)



class PrivacyUnits(Protocol):
    """The training split as privacy units: ``len()`` units, ``per_unit`` patches from each in a step."""

    per_unit: int

    def __len__(self) -> int: ...

    def batch(self, chosen: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """LR and HR (len(chosen) * per_unit, 1, ...) float32, unit-major (a unit's patches are consecutive)."""


class PatientUnits:
    """Patients as units: each chosen patient gives ``per_unit`` patches drawn by the site's own sampler from that
    patient's scans only."""

    def __init__(self, site: PreparedSite, job: RoundJob, rng: np.random.Generator, per_unit: int) -> None:
        by_patient: dict[str, list[ScanPair]] = defaultdict(list)
        for pair in site.train:
            by_patient[pair.patient].append(pair)
        self.samplers = [site.pairing.sampler(by_patient[p], site.scale, job.patch_size, rng)
                         for p in sorted(by_patient)]
        self.per_unit = per_unit

    def __len__(self) -> int:
        return len(self.samplers)

    def batch(self, chosen: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lrs, hrs = zip(*(self.samplers[unit].batch(self.per_unit) for unit in chosen))
        return torch.cat(lrs), torch.cat(hrs)


class TileUnits:
    """Non-overlapping patch-sized tiles of the training scans as units (``dp-unit = "patch"``): a finite set, so
    that Poisson sampling over it is what the accountant assumes. 2D: (p, p) tiles of every slice; 3D: (p, p, p)
    cubes (p: the LR patch side); tiles without anatomy (HR below the foreground level) are left out."""

    per_unit = 1

    def __init__(self, pairs: Sequence[ScanPair], scale: int, hr_size: int, spatial_dims: int) -> None:
        self.pairs, self.scale, self.size, self.dims = list(pairs), scale, hr_size // scale, spatial_dims
        self.tiles = [(index, corner) for index, pair in enumerate(self.pairs) for corner in self._corners(pair)
                      if self._crop(pair, corner)[1].max() >= FOREGROUND_LEVEL]
        if not self.tiles:
            raise ValueError("no training tile with anatomy: lower --patch-size")

    def _corners(self, pair: ScanPair) -> list[tuple[int, ...]]:
        p, shape = self.size, pair.lr.shape
        grid = [range(0, shape[axis] - p + 1, p) for axis in range(self.dims)]
        if self.dims == 2:
            grid.append(range(shape[2]))
        return [tuple(int(c) for c in corner) for corner in np.stack(np.meshgrid(*grid, indexing="ij"), -1)
                .reshape(-1, len(grid))]

    def _crop(self, pair: ScanPair, corner: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        p, s = self.size, self.scale
        lr_index = tuple(slice(c, c + p) for c in corner[: self.dims]) + tuple(corner[self.dims:])
        hr_index = tuple(slice(c * s, (c + p) * s) for c in corner[: self.dims]) + tuple(corner[self.dims:])
        return pair.lr[lr_index], pair.hr[hr_index]

    def __len__(self) -> int:
        return len(self.tiles)

    def batch(self, chosen: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [self._crop(self.pairs[self.tiles[unit][0]], self.tiles[unit][1]) for unit in chosen]
        lr = np.stack([c[0] for c in crops])[:, None]
        hr = np.stack([c[1] for c in crops])[:, None]
        return torch.from_numpy(np.ascontiguousarray(lr)), torch.from_numpy(np.ascontiguousarray(hr))


@dataclass(frozen=True)
class PrivacyPlan:
    """One DP round at a site: ``units`` privacy units of kind ``unit``, each in a step with probability
    ``sample_rate``; noise std ``noise_multiplier`` x ``clip_norm``; ``steps`` steps; ``delta`` the site's."""

    unit: str
    units: int
    per_unit: int
    sample_rate: float
    noise_multiplier: float
    clip_norm: float
    steps: int
    delta: float

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)


def privacy_units(site: PreparedSite, job: RoundJob, rng: np.random.Generator) -> PrivacyUnits:
    """The training split as the job's privacy units (patients, or tiles for ``dp-unit = "patch"``)."""
    if job.dp_unit == "patient":
        return PatientUnits(site, job, rng, job.dp_patches_per_patient)
    from client.training import PatchSampler

    probe = site.pairing.sampler(site.train, site.scale, job.patch_size, rng)
    if not isinstance(probe, PatchSampler):
        raise ValueError(f"dp-unit 'patch' is built for in-plane and isotropic pairs, not {type(probe).__name__}; "
                         "use dp-unit 'patient'")
    return TileUnits(site.train, site.scale, job.patch_size, probe.spatial_dims)


def plan_round(units: PrivacyUnits, job: RoundJob, delta: float) -> PrivacyPlan:
    """The round's DP-SGD parameters: q = (batch-size / patches per unit) / units (at most 1), sigma given or
    planned for all ``num-rounds`` x ``local-steps`` steps to spend ``dp-target-epsilon`` at ``delta``."""
    sample_rate = min(1.0, job.batch_size / units.per_unit / len(units))
    sigma = job.dp_noise_multiplier or planned_noise(job.dp_target_epsilon, delta, sample_rate,
                                                     job.num_rounds * job.local_steps)
    return PrivacyPlan(job.dp_unit, len(units), units.per_unit, sample_rate, sigma, job.dp_clip_norm,
                       job.local_steps, delta)


@functools.cache
def planned_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier with which ``steps`` steps at ``sample_rate`` spend ``target_epsilon`` (Opacus' search,
    RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.01))


class PrivateGradient:
    """DP gradients of one network: per-sample gradients (Opacus' ``GradSampleModule`` hooks on ``module``),
    averaged per unit, each unit's clipped to ``plan.clip_norm``, summed, noised with std ``noise_scale`` x sigma
    x C and divided by the expected number of units per step. :meth:`close` removes the hooks."""

    def __init__(self, module: nn.Module, plan: PrivacyPlan, noise: torch.Generator, noise_scale: float = 1.0) -> None:
        from opacus import GradSampleModule

        self.module = GradSampleModule(module, loss_reduction="mean")
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.plan, self.noise, self.noise_scale = plan, noise, noise_scale
        self.clipped = 0

    def step_gradients(self, loss: Callable[[nn.Module], torch.Tensor] | None, row_units: torch.Tensor,
                       n_units: int) -> float | None:
        """Set every parameter's ``.grad``; ``loss(module)`` computes the batch's mean loss through the hooked
        module (None: no unit sampled, the gradient is noise only); ``row_units``: the unit (0..n_units-1) of each
        batch row. Returns the loss value."""
        value, summed = None, [torch.zeros_like(p) for p in self.params]
        if loss is not None and n_units:
            unit_grads, value = self.unit_gradients(loss, row_units, n_units)
            factors, clipped = clip_factors(unit_grads, self.plan.clip_norm)
            summed = [torch.tensordot(factors, g, dims=1) for g in unit_grads]
            self.clipped += clipped
        std = self.noise_scale * self.plan.noise_multiplier * self.plan.clip_norm
        for p, total in zip(self.params, summed):
            gaussian = torch.normal(0.0, std, p.shape, generator=self.noise, device=p.device)
            p.grad = (total + gaussian) / (self.plan.sample_rate * self.plan.units)
        return value

    def unit_gradients(self, loss: Callable[[nn.Module], torch.Tensor], row_units: torch.Tensor,
                       n_units: int) -> tuple[list[torch.Tensor], float]:
        """Each unit's gradient, the mean of its rows' per-sample gradients: one (n_units, *p.shape) tensor per
        parameter; and the loss."""
        for p in self.params:
            p.grad, p.grad_sample = None, None
        value = loss(self.module)
        if not torch.isfinite(value):
            raise FloatingPointError("training loss became NaN/Inf; lower --learning-rate")
        with warnings.catch_warnings():  # Opacus' hooks on a model whose input needs no gradient: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            value.backward()
        counts = torch.bincount(row_units, minlength=n_units).clamp(min=1).to(value.device)
        grads = []
        for p in self.params:
            per_unit = torch.zeros((n_units, *p.shape), device=p.device).index_add_(0, row_units.to(p.device),
                                                                                     p.grad_sample)
            grads.append(per_unit / counts.view(-1, *[1] * p.dim()))
            p.grad, p.grad_sample = None, None
        return grads, float(value.detach())

    def close(self) -> None:
        self.module.to_standard_module()


def unit_rows(n_units: int, per_unit: int) -> torch.Tensor:
    """The unit of each row of a unit-major batch (``per_unit`` consecutive rows per unit)."""
    return torch.arange(n_units).repeat_interleave(per_unit)


def train_private(model: nn.Module, units: PrivacyUnits, plan: PrivacyPlan, job: RoundJob) -> dict[str, float]:
    """``plan.steps`` DP-SGD (Adam) steps on ``units`` with the job's loss and learning rate; ``model`` is trained
    in place and left on the job's device. FedProx's term (``job.proximal``) is added to the private gradient after
    clipping and noise (it reads no training data). ``train-loss``: the mean over the last quarter of the steps that
    sampled a unit; when none did, the trained model's loss on an expected step's worth of units (no gradient).
    Returns ``train-*`` metrics and what clipping did (``dp-clipped-fraction``: of the units sampled;
    ``dp-units-per-step``: mean)."""
    device = job.torch_device
    criterion = loss_from_spec(job.loss).to(device)
    model.to(device, memory_format=torch.contiguous_format).train()
    proximal = job.proximal(model)
    sampling, noise = private_randomness(device)
    private = PrivateGradient(model, plan, noise)
    optimiser = torch.optim.Adam(private.params, lr=job.learning_rate)
    losses, sampled = [], 0
    start = time.perf_counter()
    for _step in range(plan.steps):
        chosen = np.flatnonzero(sampling.random(plan.units) < plan.sample_rate)
        batch_loss = None
        if len(chosen):
            lr, hr = (t.to(device) for t in units.batch(chosen))
            batch_loss = functools.partial(_batch_loss, criterion=criterion, lr=lr, hr=hr)
        value = private.step_gradients(batch_loss, unit_rows(len(chosen), units.per_unit), len(chosen))
        if proximal is not None:
            proximal.add_to_gradients()
        optimiser.step()
        if value is not None:
            losses.append(value)
        sampled += len(chosen)
    private.close()  # hooks and per-sample buffers gone; ``model`` keeps its trained weights
    if not losses:  # Poisson sampling drew no unit in any step (rare; the update is noise alone): the loss of the
        # trained model on an expected step's worth of units, so the reply's train-loss stays a number
        expected = np.arange(min(plan.units, max(1, round(plan.sample_rate * plan.units))))
        lr, hr = (t.to(device) for t in units.batch(expected))
        with torch.no_grad():
            losses.append(float(_batch_loss(model, criterion=criterion, lr=lr, hr=hr)))
    tail = float(np.mean(losses[-max(1, len(losses) // 4):]))
    return {"train-loss": tail, "train-patches": sampled * units.per_unit, "train-seconds": time.perf_counter() - start,
            **clipping_metrics(private.clipped, sampled, plan)}


def clipping_metrics(clipped: int, sampled: int, plan: PrivacyPlan) -> dict[str, float]:
    """``dp-clipped-fraction`` (units scaled down, of those sampled) and ``dp-units-per-step`` (mean)."""
    return {"dp-clipped-fraction": clipped / max(1, sampled), "dp-units-per-step": sampled / plan.steps}


def _batch_loss(module: nn.Module, *, criterion: nn.Module, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    return criterion(module(lr).float(), hr)


def private_randomness(device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
    """The Poisson sampling and the noise generators, seeded from the operating system's entropy: the guarantee
    needs both unpredictable (so DP runs are not bit-reproducible)."""
    sampling = np.random.default_rng(secrets.randbits(128))
    return sampling, torch.Generator(device=device).manual_seed(secrets.randbits(63))


def clip_factors(unit_grads: Sequence[torch.Tensor], clip_norm: float) -> tuple[torch.Tensor, int]:
    """Per-unit scale factors min(1, C / ||g||) over all parameters (as Opacus clips a sample), and how many units
    were scaled down. ``unit_grads``: one (n_units, ...) tensor per parameter."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in unit_grads]).norm(dim=0)
    factors = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    return factors, int((norms > clip_norm).sum())


def site_delta(site: PreparedSite) -> float:
    """The delta of the site's guarantee (site.toml ``[privacy] delta``)."""
    return site.config.privacy.delta


def check_budget(ledger: PrivacyLedger, plan: PrivacyPlan, site: PreparedSite) -> float:
    """Epsilon the site will have spent after this round; raises SiteRefusal when that passes its budget."""
    from client.policy import SiteRefusal

    after = ledger.epsilon(plan.unit, plan.delta, adding=plan.mechanism)
    budget = site.config.privacy.epsilon_budget
    if budget is not None and after > budget:
        spent = ledger.epsilon(plan.unit, plan.delta)
        raise SiteRefusal(
            "privacy-budget",
            f"this round would spend epsilon {after - spent:.3g} more, {after:.3g} in all per {plan.unit} at delta "
            f"{plan.delta:g}, past the site's budget of {budget:g} ({spent:.3g} spent)",
            site.name,
            detail=f"ledger {ledger.path}; plan {plan}",
        )
    return after


def record_spend(ledger: PrivacyLedger, plan: PrivacyPlan, job: RoundJob) -> Spend:
    """Write the round's spend to the ledger (before its weights leave the site)."""
    spend = ledger.record(run=str(job.run_id), round_=job.server_round, purpose=job.purpose, unit=plan.unit,
                          mechanism=plan.mechanism, delta=plan.delta)
    log.info("privacy: epsilon %.3f per %s at delta %g after round %d (sigma %.3f, q %.3f, %d steps)",
             spend.epsilon, plan.unit, plan.delta, job.server_round, plan.noise_multiplier, plan.sample_rate,
             plan.steps)
    if plan.unit == "patch":
        log.warning(PATCH_UNIT_WARNING)
    return spend


def weights_leave(site: PreparedSite, job: RoundJob) -> bool:
    """Whether the weights this job trains leave the site: the federated model always, the local-only model with
    the site's consent (``share_local_model``), the pooled baseline (simulation only) never."""
    return job.purpose == "" or (job.purpose == "local-baseline" and site.config.share_local_model)


def refuse_without_dp(site: PreparedSite, job: RoundJob) -> None:
    """Raise SiteRefusal when the site requires DP (``[privacy] required`` or a budget) and ``job`` is without it."""
    from client.policy import SiteRefusal

    if job.dp == "none" and site.config.privacy.dp_required and weights_leave(site, job):
        raise SiteRefusal("privacy-required", "the site trains only with differential privacy: run with dp = "
                          "'local'", site.name)


def private_fit(model: nn.Module, site: PreparedSite, job: RoundJob, rng: np.random.Generator,
                train: Callable[[nn.Module, PrivacyUnits, PrivacyPlan, RoundJob], dict[str, float]] = train_private,
                ) -> dict[str, float]:
    """One DP round at ``site``: plan, check the budget (refusing beforehand), ``train`` (default: supervised
    DP-SGD, :func:`train_private`), and record the spend in the site's ledger when the weights leave. Returns
    ``train``'s metrics and the ``dp-*`` ones."""
    from client.state import site_state_dir

    units = privacy_units(site, job, rng)
    plan = plan_round(units, job, site_delta(site))
    ledger = PrivacyLedger.open(site_state_dir(job.node_config, site.directory))
    leaves = weights_leave(site, job)
    if leaves:
        check_budget(ledger, plan, site)
    metrics = train(model, units, plan, job)
    epsilon = record_spend(ledger, plan, job).epsilon if leaves else ledger.epsilon(plan.unit, plan.delta)
    return {**metrics, **privacy_metrics(plan, epsilon)}


def privacy_metrics(plan: PrivacyPlan, spend_epsilon: float) -> dict[str, float]:
    """The numbers a DP round reports with its weights (all scalars); the unit is the run's ``dp-unit``."""
    return {"dp-epsilon": spend_epsilon, "dp-delta": plan.delta, "dp-noise-multiplier": plan.noise_multiplier,
            "dp-sample-rate": plan.sample_rate, "dp-units": plan.units, "dp-clip-norm": plan.clip_norm,
            "dp-patient-unit": float(plan.unit == "patient")}
