"""One-axis (SMORE-style) SR: thick-slice sites learn from their own in-plane resolution, thin-slice sites from
through-plane pairs, and both train the same network, so they can be federated together.

The site's ``supervision`` (``site.toml``) picks its data (:mod:`client.selfsup`): ``"paired"`` (default) or
``"self"``. Training is the supervised loop on (LR, HR) patches with the degraded axis last; evaluation restores
through-plane at paired sites and scores the in-plane proxy at self-supervised sites, beside the interpolation
baseline (``bicubic_*`` keys), with the keys of :func:`client.evaluation.evaluate_pairs`.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from client.selfsup import PlaneSampler, SmoreSite, evaluate_axis_pairs, prepare_smore_site, training_planes
from client.tasks import register_task
from client.tasks.base import LocalTask, RoundJob, TrainResult
from client.tasks.supervised import round_seed
from client.training import train_supervised


def _check_site(site: object) -> SmoreSite:
    if not isinstance(site, SmoreSite):
        raise TypeError(f"the smore task needs a site from SmoreTask.prepare, got {type(site).__name__}")
    return site


@register_task("smore")
class SmoreTask(LocalTask):
    """Self-supervised (thick-slice sites) or paired (thin-slice sites) one-axis SR with one shared network."""

    def prepare(self, site_dir: str, job: RoundJob) -> SmoreSite:
        return prepare_smore_site(site_dir, job.scale)

    def train(self, model: nn.Module, site: SmoreSite, job: RoundJob, state: RecordDict) -> TrainResult:
        site = _check_site(site)
        seed = round_seed(site, job)
        torch.manual_seed(seed)
        sampler = PlaneSampler(site.train, site.scale, job.patch_size, np.random.default_rng(seed))
        stats = train_supervised(
            model, sampler, steps=job.local_steps, batch_size=job.batch_size,
            learning_rate=job.learning_rate, loss=job.loss, device=job.device,
        )
        metrics = {
            "num-examples": training_planes(site.train),
            "train-loss": stats.loss,
            "train-patches": stats.patches,
            "train-seconds": stats.seconds,
        }
        return TrainResult({k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics)

    def evaluate(self, model: nn.Module, site: SmoreSite, job: RoundJob) -> dict[str, float]:
        site = _check_site(site)
        return evaluate_axis_pairs(model, site.val, device=job.device, max_slices=job.eval_max_slices)
