"""GAN super-resolution at one site: an RRDB generator against a patch discriminator (ESRGAN-style).

The supervised task with two steps changed. Its options (:class:`shared_models.gan.GanOptions`, sent with each
round as ``gan.*``):

- ``gan.discriminator``: ``"federated"`` (both networks are averaged) or ``"local"`` (only the generator leaves
  the site; each site keeps its own discriminator, and its optimiser state, in its state folder: the SuperNode's
  ``state-dir`` node config, else ``SITE/.fedsr-state``).
- ``gan.warmup-rounds``: rounds ``1..N`` train the generator with the pixel loss only (PSNR-oriented start,
  as ESRGAN pre-trains its generator); the discriminator is neither used nor changed.
- ``gan.adversarial-weight``: weight of the relativistic adversarial term after warm-up.

After warm-up the generator loss is ``pixel (job.loss) + 0.1 * structural (SSIM, or HFEN) + weight *
relativistic average adversarial loss``, and the discriminator takes one step per generator step. Under FedProx
(``proximal-mu`` > 0) each network's loss also has the proximal term over its weights that travel
(:meth:`client.tasks.base.RoundJob.proximal`): the generator's always, the discriminator's when it is federated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.pairs import BatchSource, PreparedSite
from client.privacy import PrivacyPlan, PrivacyUnits, PrivateGradient, clipping_metrics, private_fit, \
    private_randomness, unit_rows
from client.state import StateError, load_state, save_state_atomic
from client.tasks.base import RoundJob
from client.tasks.supervised import SupervisedTask, round_seed
from shared_models.gan import DISCRIMINATOR_PREFIX, GANPair, GanOptions, PatchDiscriminator
from shared_models.losses import ADVERSARIAL_LOSSES, build_loss, parse_loss
from shared_models.registry import model_spec, unwrap

log = logging.getLogger(__name__)

#: Weight of the structural term (SSIM, or HFEN) added to the pixel loss after warm-up.
STRUCTURAL_WEIGHT = 0.1
#: Adversarial formulation (``shared_models.losses.ADVERSARIAL_LOSSES``).
ADVERSARIAL_LOSS = "relativistic"
#: ... and under DP, where each sample's loss must depend on that sample alone (see _train_pair_private).
PRIVATE_ADVERSARIAL_LOSS = "nonsaturating"
#: Adam betas of both networks (ESRGAN).
ADAM_BETAS = (0.9, 0.99)

STATE_FORMAT = "fedsr-gan-discriminator"
STATE_VERSION = 1


def discriminator_state_path(state_dir: Path, model: nn.Module) -> Path:
    """The site's discriminator file for this architecture (one file per model spec, so runs with other
    architectures or scales at the same site do not overwrite each other)."""
    spec = json.dumps(model_spec(model), sort_keys=True)
    return Path(state_dir) / f"gan-discriminator-{hashlib.sha256(spec.encode()).hexdigest()[:12]}.pt"


def structural_term(loss_terms: dict[str, float], patch_size: int) -> str | None:
    """The structural term to add: SSIM (needs patches >= 11 px), else HFEN; none the pixel loss already has."""
    for name in ("ssim", "hfen"):
        if name in loss_terms or (name == "ssim" and patch_size < 11):
            continue
        return name
    return None


def _pair(model: nn.Module) -> GANPair:
    pair = unwrap(model)
    if not isinstance(pair, GANPair):
        raise TypeError(f"the GAN task needs a GANPair model, got {type(pair).__name__}")
    return pair


def _options(job: RoundJob) -> GanOptions:
    return job.options if isinstance(job.options, GanOptions) else GanOptions()


class GanTask(SupervisedTask):
    """Paired in-plane SR with an adversarial generator loss; the generator is what is evaluated."""

    def load_global(self, model: nn.Module, weights: dict[str, torch.Tensor], site: PreparedSite, job: RoundJob) -> None:
        """Load the coordinator's weights: every key ("federated"), or exactly the generator's ("local": the
        discriminator is the site's own, restored from its state folder when it trains); a personal head is the
        site's own either way (the supervised task's ``load_global``). A coordinator that sends the other mode's
        weights is an error naming both."""
        pair = _pair(model)
        mode = _options(job).discriminator
        sent_discriminator = any(k.startswith(DISCRIMINATOR_PREFIX) for k in weights)
        if sent_discriminator != (mode == "federated"):
            sent = "discriminator weights" if sent_discriminator else "no discriminator weights"
            raise ValueError(
                f"gan.discriminator is {mode!r} but the coordinator sent {sent}: in 'local' mode it must send the "
                "generator only, in 'federated' mode both networks"
            )
        super().load_global(pair, weights, site, job)  # exactly the travelling keys; the site's head, acquisition

    def fit(self, model: nn.Module, site: PreparedSite, job: RoundJob, rng: np.random.Generator) -> dict[str, float]:
        sampler = site.pairing.sampler(site.train, site.scale, job.patch_size, rng)
        return self._fit_pair(model, site, job, functools.partial(_train_pair, sampler=sampler, job=job))

    def fit_private(self, model: nn.Module, site: PreparedSite, job: RoundJob, rng: np.random.Generator) -> dict[str, float]:
        """DP-SGD for both networks (the discriminator sees the real scans too): see :func:`_train_pair_private`."""

        def train(model: nn.Module, units: PrivacyUnits, plan: PrivacyPlan, job: RoundJob) -> dict[str, float]:
            return self._fit_pair(model, site, job, functools.partial(_train_pair_private, units=units, plan=plan,
                                                                      job=job))

        return private_fit(model, site, job, rng, train)

    def _fit_pair(self, model: nn.Module, site: PreparedSite, job: RoundJob, train) -> dict[str, float]:
        """``train(pair, gan=options, adversarial=..., optimiser_state=...)`` between restoring and saving a local
        discriminator (``gan.discriminator = "local"``)."""
        pair = _pair(model)
        options = _options(job)
        adversarial = options.adversarial(job.server_round)
        local = adversarial and options.discriminator == "local"
        optimiser_state, state_path = None, None
        if local:
            state_path = discriminator_state_path(job.state_folder(site.directory), pair)
            restored = _restore_discriminator(pair, site, state_path)
            if restored is None or int(restored["round"]) >= job.server_round:
                # No file yet, or one from another run (rounds only grow within a run; a resumed run goes on).
                _reset_discriminator(pair, round_seed(site, job))
            else:
                optimiser_state = restored["optimiser"]
        stats = train(pair, gan=options, adversarial=adversarial, optimiser_state=optimiser_state)
        optimiser_after = stats.pop("optimiser")
        if state_path is not None:
            save_state_atomic(
                state_path,
                {
                    "format": STATE_FORMAT,
                    "version": STATE_VERSION,
                    "model": json.dumps(model_spec(pair), sort_keys=True),
                    "round": int(job.server_round),
                    "discriminator": pair.discriminator.state_dict(),
                    "optimiser": optimiser_after,
                },
            )
        return stats


def _train_pair(
    pair: GANPair,
    *,
    sampler: BatchSource,
    job: RoundJob,
    gan: GanOptions,
    adversarial: bool,
    optimiser_state: dict | None,
) -> dict:
    """``job.local_steps`` generator steps (+ one discriminator step each when ``adversarial``); in place.

    Returns the metrics (tail means over the last quarter of steps) and, under ``"optimiser"``, the
    discriminator optimiser's state (None when the discriminator was not trained).
    """
    device = job.torch_device
    pixel_loss, structural = _generator_losses(job, device)
    generator_adv, discriminator_adv = ADVERSARIAL_LOSSES[ADVERSARIAL_LOSS]
    generator, discriminator = pair.generator, pair.discriminator
    pair.to(device).train()
    proximal_g, proximal_d = job.proximal(pair, generator), job.proximal(pair, discriminator)
    opt_g = torch.optim.Adam(generator.parameters(), lr=job.learning_rate, betas=ADAM_BETAS)
    opt_d = _discriminator_optimiser(discriminator.parameters(), job, optimiser_state) if adversarial else None

    pixel_values, d_values, adv_values = [], [], []
    start = time.perf_counter()
    for _ in range(job.local_steps):
        lr, hr = sampler.batch(job.batch_size)
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        sr = generator(lr)
        pixel = pixel_loss(sr, hr)
        total = pixel
        if adversarial:
            discriminator.requires_grad_(False)  # the generator step must not touch the discriminator
            adv = generator_adv(discriminator(hr).detach(), discriminator(sr))
            total = pixel + gan.adversarial_weight * adv
            if structural is not None:
                total = total + STRUCTURAL_WEIGHT * structural(sr, hr)
            adv_values.append(adv.detach())
        if not torch.isfinite(total):
            raise FloatingPointError("generator loss became NaN/Inf; lower --learning-rate")
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        if proximal_g is not None:
            proximal_g.add_to_gradients()
        opt_g.step()
        pixel_values.append(pixel.detach())
        if adversarial:
            discriminator.requires_grad_(True)
            d_loss = discriminator_adv(discriminator(hr), discriminator(sr.detach()))
            if not torch.isfinite(d_loss):
                raise FloatingPointError("discriminator loss became NaN/Inf; lower --learning-rate")
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if proximal_d is not None:
                proximal_d.add_to_gradients()
            opt_d.step()
            d_values.append(d_loss.detach())

    return {
        **_tail_means(pixel_values, d_values, adv_values),
        "train-patches": job.local_steps * job.batch_size,
        "train-seconds": time.perf_counter() - start,
        "optimiser": opt_d.state_dict() if opt_d is not None else None,
    }


def _train_pair_private(
    pair: GANPair,
    *,
    units: PrivacyUnits,
    plan: PrivacyPlan,
    job: RoundJob,
    gan: GanOptions,
    adversarial: bool,
    optimiser_state: dict | None,
) -> dict:
    """``plan.steps`` DP-SGD steps of the generator (+ one of the discriminator each when ``adversarial``); in
    place. The same statistics as :func:`_train_pair`, plus the ``dp-*`` clipping ones.

    Each step samples units once (Poisson) and computes both networks' clipped, noised per-unit gradients on
    that batch from the networks as they were before the step (the discriminator gets the generator's output
    before its update). Together that is one Gaussian mechanism on the pair of gradients, of sensitivity
    sqrt(2) C, so each network gets noise sqrt(2) x sigma x C and the ledger records sigma, the mechanism's
    multiplier (warm-up rounds train the generator alone, with sigma x C). Under DP the adversarial term is the
    non-saturating one: the relativistic average compares each sample with the batch mean, so one patient's data
    would reach every other sample's gradient and per-unit clipping would bound nothing.
    """
    device = job.torch_device
    pixel_loss, structural = _generator_losses(job, device)
    generator_adv, discriminator_adv = ADVERSARIAL_LOSSES[PRIVATE_ADVERSARIAL_LOSS]
    generator, discriminator = pair.generator, pair.discriminator
    pair.to(device, memory_format=torch.contiguous_format).train()
    proximal_g, proximal_d = job.proximal(pair, generator), job.proximal(pair, discriminator)
    sampling, noise = private_randomness(device)
    scale = math.sqrt(2.0) if adversarial else 1.0
    private_g = PrivateGradient(generator, plan, noise, noise_scale=scale)
    private_d = PrivateGradient(discriminator, plan, noise, noise_scale=scale) if adversarial else None
    opt_g = torch.optim.Adam(private_g.params, lr=job.learning_rate, betas=ADAM_BETAS)
    opt_d = _discriminator_optimiser(private_d.params, job, optimiser_state) if private_d else None
    pixel_values, d_values, adv_values, sampled = [], [], [], 0
    start = time.perf_counter()
    for _ in range(plan.steps):
        chosen = np.flatnonzero(sampling.random(plan.units) < plan.sample_rate)
        rows = unit_rows(len(chosen), units.per_unit)
        lr, hr = (t.to(device) for t in units.batch(chosen)) if len(chosen) else (None, None)
        taken: dict[str, torch.Tensor] = {}

        def generator_loss(module: nn.Module) -> torch.Tensor:
            sr = module(lr)
            taken["sr"], taken["pixel"] = sr.detach(), pixel_loss(sr, hr)
            if not adversarial:
                return taken["pixel"]
            discriminator.requires_grad_(False)
            private_d.module.disable_hooks()  # the generator's gradient passes through it: no per-sample work
            taken["adv"] = generator_adv(discriminator(hr).detach(), discriminator(sr))
            total = taken["pixel"] + gan.adversarial_weight * taken["adv"]
            return total + STRUCTURAL_WEIGHT * structural(sr, hr) if structural is not None else total

        def discriminator_loss(module: nn.Module) -> torch.Tensor:
            logits = module(torch.cat([hr, taken["sr"]]))
            return discriminator_adv(logits[: len(hr)], logits[len(hr):])

        private_g.step_gradients(generator_loss if len(chosen) else None, rows, len(chosen))
        if private_d is not None:
            discriminator.requires_grad_(True)
            private_d.module.enable_hooks()
            d_value = private_d.step_gradients(discriminator_loss if len(chosen) else None,
                                               torch.cat([rows, rows]), len(chosen))
            if proximal_d is not None:
                proximal_d.add_to_gradients()
            opt_d.step()
            if d_value is not None:
                d_values.append(torch.tensor(d_value))
        if proximal_g is not None:
            proximal_g.add_to_gradients()
        opt_g.step()
        sampled += len(chosen)
        if "pixel" in taken:
            pixel_values.append(taken["pixel"].detach())
        if "adv" in taken:
            adv_values.append(taken["adv"].detach())
    private_g.close()
    if private_d is not None:
        private_d.close()
    return {
        **_tail_means(pixel_values, d_values, adv_values),
        "train-patches": sampled * units.per_unit,
        "train-seconds": time.perf_counter() - start,
        "optimiser": opt_d.state_dict() if opt_d is not None else None,
        **clipping_metrics(private_g.clipped, sampled, plan),
    }


def _generator_losses(job: RoundJob, device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """The pixel loss (``job.loss``) and the structural term added after warm-up (None if the loss has it)."""
    terms = parse_loss(job.loss)
    structural_name = structural_term(terms, job.patch_size)
    structural = build_loss({structural_name: 1.0}).to(device) if structural_name else None
    return build_loss(terms).to(device), structural


def _discriminator_optimiser(params, job: RoundJob, optimiser_state: dict | None) -> torch.optim.Adam:
    """The discriminator's Adam, with the site's saved state when it fits, at this round's learning rate."""
    params = list(params)
    opt_d = torch.optim.Adam(params, lr=job.learning_rate, betas=ADAM_BETAS)
    if optimiser_state is not None:
        try:
            opt_d.load_state_dict(optimiser_state)
        except (ValueError, KeyError, RuntimeError) as err:
            log.warning("discarding the saved discriminator optimiser state (%s)", err)
            opt_d = torch.optim.Adam(params, lr=job.learning_rate, betas=ADAM_BETAS)
        for group in opt_d.param_groups:
            group["lr"] = job.learning_rate  # this round's rate, not the saved one
    return opt_d


def _tail_means(pixel: list[torch.Tensor], d: list[torch.Tensor], adv: list[torch.Tensor]) -> dict[str, float]:
    """``train-loss``, ``d-loss`` and ``g-adv-loss``: means over the last quarter of the steps that had them."""

    def tail_mean(values: list[torch.Tensor]) -> float:
        return torch.stack(values[-max(1, len(values) // 4):]).mean().item() if values else 0.0

    return {"train-loss": tail_mean(pixel), "d-loss": tail_mean(d), "g-adv-loss": tail_mean(adv)}


def _restore_discriminator(pair: GANPair, site: PreparedSite, path: Path) -> dict | None:
    """Load the site's saved discriminator at ``path`` into ``pair``; returns the saved record, or None (fresh init
    kept) when there is no usable file (none yet, another architecture, unreadable: logged, then ignored)."""
    try:
        saved = load_state(path)
    except StateError as err:
        log.warning("site %s: no local discriminator restored: %s", site.name, err)
        return None
    if saved is None:
        return None
    if saved.get("format") != STATE_FORMAT or saved.get("model") != json.dumps(model_spec(pair), sort_keys=True):
        log.warning("site %s: %s is not this model's discriminator; starting a fresh one", site.name, path)
        return None
    try:
        pair.discriminator.load_state_dict(saved["discriminator"])
    except (KeyError, RuntimeError) as err:
        log.warning("site %s: %s does not fit the discriminator (%s); starting a fresh one", site.name, path, err)
        return None
    return saved


def _reset_discriminator(pair: GANPair, seed: int) -> None:
    """A fresh discriminator, the same for a given seed (reproducible runs), without touching the global RNG."""
    params = model_spec(pair)["params"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = PatchDiscriminator(
            in_channels=params["in_channels"], width=params["d_width"], layers=params["d_layers"],
            norm=params["d_norm"],
        )
    pair.discriminator.load_state_dict(fresh.state_dict())
