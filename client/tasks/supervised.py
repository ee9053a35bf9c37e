"""Supervised SR from paired data: the site's HR scans and the LR its own scanner model makes of them."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from client.evaluation import evaluate_pairs
from client.pairs import PreparedSite, prepare_site, site_seed
from client.tasks import register_task
from client.tasks.base import LocalTask, RoundJob, TrainResult
from client.training import PatchSampler, train_supervised


def round_seed(site: PreparedSite, job: RoundJob) -> int:
    """A seed that differs per site and round but is fixed for a given run seed (reproducible runs)."""
    return site_seed(site.name, job.seed * 100_003 + job.server_round)


def spatial_dims(job: RoundJob) -> int:
    """2 or 3: the model's own setting, as the coordinator sent it."""
    return int(job.model_params.get("spatial_dims", 2))


@register_task("*")
class SupervisedTask(LocalTask):
    """Paired SR: 2D models learn in-plane SR from slices, 3D models learn from isotropically degraded cubes."""

    def prepare(self, site_dir: str, job: RoundJob) -> PreparedSite:
        return prepare_site(site_dir, job.scale, "isotropic" if spatial_dims(job) == 3 else "in-plane")

    def train(self, model: nn.Module, site: PreparedSite, job: RoundJob, state: RecordDict) -> TrainResult:
        seed = round_seed(site, job)
        torch.manual_seed(seed)
        sampler = PatchSampler(
            site.train, site.scale, job.patch_size, np.random.default_rng(seed), spatial_dims=spatial_dims(job)
        )
        stats = train_supervised(
            model, sampler, steps=job.local_steps, batch_size=job.batch_size,
            learning_rate=job.learning_rate, loss=job.loss, device=job.device,
        )
        metrics = {
            "num-examples": sum(p.hr.shape[2] for p in site.train),
            "train-loss": stats.loss,
            "train-patches": stats.patches,
            "train-seconds": stats.seconds,
        }
        return TrainResult({k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics)

    def evaluate(self, model: nn.Module, site: PreparedSite, job: RoundJob) -> dict[str, float]:
        return evaluate_pairs(model, site.val, scale=site.scale, device=job.device, max_slices=job.eval_max_slices)
