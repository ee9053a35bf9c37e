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
relativistic average adversarial loss``, and the discriminator takes one step per generator step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.pairs import BatchSource, PreparedSite
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
        discriminator is the site's own, restored from its state folder when it trains). A coordinator that sends
        the other mode's weights is an error naming both."""
        pair = _pair(model)
        mode = _options(job).discriminator
        sent_discriminator = any(k.startswith(DISCRIMINATOR_PREFIX) for k in weights)
        if sent_discriminator != (mode == "federated"):
            sent = "discriminator weights" if sent_discriminator else "no discriminator weights"
            raise ValueError(
                f"gan.discriminator is {mode!r} but the coordinator sent {sent}: in 'local' mode it must send the "
                "generator only, in 'federated' mode both networks"
            )
        if mode == "federated":
            pair.load_state_dict(weights)
            return
        expected = {k for k in pair.state_dict() if not k.startswith(DISCRIMINATOR_PREFIX)}
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise ValueError(f"generator weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        pair.load_state_dict(weights, strict=False)  # shapes are still checked

    def fit(self, model: nn.Module, site: PreparedSite, job: RoundJob, rng: np.random.Generator) -> dict[str, float]:
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
        sampler = site.pairing.sampler(site.train, site.scale, job.patch_size, rng)
        stats = _train_pair(pair, sampler, job, options, adversarial, optimiser_state)
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
    terms = parse_loss(job.loss)
    pixel_loss = build_loss(terms).to(device)
    structural_name = structural_term(terms, job.patch_size)
    structural = build_loss({structural_name: 1.0}).to(device) if structural_name else None
    generator_adv, discriminator_adv = ADVERSARIAL_LOSSES[ADVERSARIAL_LOSS]
    generator, discriminator = pair.generator, pair.discriminator
    pair.to(device).train()
    opt_g = torch.optim.Adam(generator.parameters(), lr=job.learning_rate, betas=ADAM_BETAS)
    opt_d = None
    if adversarial:
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=job.learning_rate, betas=ADAM_BETAS)
        if optimiser_state is not None:
            try:
                opt_d.load_state_dict(optimiser_state)
            except (ValueError, KeyError, RuntimeError) as err:
                log.warning("discarding the saved discriminator optimiser state (%s)", err)
                opt_d = torch.optim.Adam(discriminator.parameters(), lr=job.learning_rate, betas=ADAM_BETAS)
            for group in opt_d.param_groups:
                group["lr"] = job.learning_rate  # this round's rate, not the saved one

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
        opt_g.step()
        pixel_values.append(pixel.detach())
        if adversarial:
            discriminator.requires_grad_(True)
            d_loss = discriminator_adv(discriminator(hr), discriminator(sr.detach()))
            if not torch.isfinite(d_loss):
                raise FloatingPointError("discriminator loss became NaN/Inf; lower --learning-rate")
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            d_values.append(d_loss.detach())

    tail = max(1, job.local_steps // 4)

    def tail_mean(values: list[torch.Tensor]) -> float:
        return torch.stack(values[-tail:]).mean().item() if values else 0.0

    return {
        "train-loss": tail_mean(pixel_values),
        "train-patches": job.local_steps * job.batch_size,
        "train-seconds": time.perf_counter() - start,
        "d-loss": tail_mean(d_values),
        "g-adv-loss": tail_mean(adv_values),
        "optimiser": opt_d.state_dict() if opt_d is not None else None,
    }


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
