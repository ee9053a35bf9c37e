"""Supervised SR from paired data, the local task every family uses or extends.

A round at a site: load the coordinator's weights, draw patches from the site's training pairs with a seed fixed
per (run seed, site, round), train, and send back the weights that travel (the family's ``shared_state``) with
``num-examples`` and the training statistics. Families change one step by overriding it: :meth:`pairing` (how
scans become pairs, are sampled and scored), :meth:`load_global`, :meth:`fit` (the optimisation itself).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from client.acquisition import site_acquisition
from client.evaluation import evaluate_pairs
from client.paired import paired_for
from client.pairs import Pairing, PreparedSite, prepare_site, site_seed
from client.personal import evaluation_head, keep_head, start_head
from client.privacy import private_fit, refuse_without_dp
from client.tasks.base import LocalTask, RoundJob, TrainResult
from client.training import train_supervised
from shared_models.conditioning import set_acquisition
from shared_models.registry import family_of, load_shared_state


def round_seed(site: PreparedSite, job: RoundJob) -> int:
    """A seed that differs per site and round but is fixed for a given run seed (reproducible runs)."""
    return site_seed(site.name, job.seed * 100_003 + job.server_round)


class SupervisedTask(LocalTask):
    """Paired SR: 2D models learn in-plane SR from slices, 3D models learn from isotropically degraded cubes."""

    def pairing(self, job: RoundJob) -> Pairing:
        """How this task's sites make pairs (paired data, in-plane or isotropic by ``spatial-dims``)."""
        return paired_for(job.spatial_dims)

    def prepare(self, site_dir: str, job: RoundJob) -> PreparedSite:
        return prepare_site(site_dir, job.scale, self.pairing(job))

    def load_global(self, model: nn.Module, weights: dict[str, torch.Tensor], site: PreparedSite, job: RoundJob) -> None:
        """Put the coordinator's weights into the freshly built model: exactly the keys its family sends. With
        ``personal = "head"`` the site's own head from an earlier round of this training, else the head as built
        (client.personal); with ``condition = "acquisition"`` the site's acquisition description
        (client.acquisition)."""
        load_shared_state(model, weights, job.options)
        start_head(model, site, job)
        if job.condition == "acquisition":
            set_acquisition(model, site_acquisition(site))

    def fit(self, model: nn.Module, site: PreparedSite, job: RoundJob, rng: np.random.Generator) -> dict[str, float]:
        """Train ``model`` in place on the site's training pairs; returns ``train-*`` metrics."""
        sampler = site.pairing.sampler(site.train, site.scale, job.patch_size, rng)
        stats = train_supervised(
            model, sampler, steps=job.local_steps, batch_size=job.batch_size,
            learning_rate=job.learning_rate, loss=job.loss, device=job.torch_device, proximal=job.proximal(model),
        )
        return {"train-loss": stats.loss, "train-patches": stats.patches, "train-seconds": stats.seconds}

    def train(self, model: nn.Module, weights: dict[str, torch.Tensor], site: PreparedSite, job: RoundJob) -> TrainResult:
        self.load_global(model, weights, site, job)
        return self._result(model, site, job, self._round(model, site, job))

    def train_alone(
        self, model: nn.Module, weights: dict[str, torch.Tensor], site: PreparedSite, job: RoundJob, rounds: int
    ) -> TrainResult:
        """Rounds 1..``rounds`` exactly as the federation runs them at this site (same seeds, patches, steps and
        optimiser restarts), with no averaging in between: the same compute, alone. ``train-seconds`` is the total;
        the other statistics are the last round's."""
        self.load_global(model, weights, site, job)
        seconds = 0.0
        for server_round in range(1, rounds + 1):
            stats = self._round(model, site, job.replace(server_round=server_round))
            seconds += stats.get("train-seconds", 0.0)
        return self._result(model, site, job, {**stats, "train-seconds": seconds})

    def fit_private(self, model: nn.Module, site: PreparedSite, job: RoundJob, rng: np.random.Generator) -> dict[str, float]:
        """:meth:`fit` under differential privacy (``dp = "local"``): DP-SGD per privacy unit, budget checked and
        spend recorded (client.privacy)."""
        return private_fit(model, site, job, rng)

    def _round(self, model: nn.Module, site: PreparedSite, job: RoundJob) -> dict[str, float]:
        """One round of local training with the round's seed; DP-SGD when the job asks for it, refused when the
        site requires DP and the job is without it."""
        seed = round_seed(site, job)
        torch.manual_seed(seed)
        if job.dp == "local":
            return self.fit_private(model, site, job, np.random.default_rng(seed))
        refuse_without_dp(site, job)
        return self.fit(model, site, job, np.random.default_rng(seed))

    def _result(self, model: nn.Module, site: PreparedSite, job: RoundJob, stats: dict[str, float]) -> TrainResult:
        """The weights that leave the site (the family's ``shared_state``) with ``num-examples`` and ``stats``; a
        personal head is saved in the site's state folder instead."""
        shared = family_of(model).shared_state(model, job.options)
        keep_head(model, site, job, shared)
        metrics = {"num-examples": site.pairing.num_examples(site.train), **stats}
        return TrainResult({k: v.detach().cpu() for k, v in shared.items()}, metrics)

    def evaluate(
        self, model: nn.Module, weights: dict[str, torch.Tensor], site: PreparedSite, job: RoundJob
    ) -> dict[str, float]:
        self.load_global(model, weights, site, job)
        evaluation_head(model, weights, site, job)
        return evaluate_pairs(model, site.val, site.pairing, device=job.torch_device, max_slices=job.eval_max_slices)
