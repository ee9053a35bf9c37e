"""What a site does for the run's report: describe itself, and score every model it is sent on its test split.

Numbers leave the site, and nothing else unless its ``site.toml`` consents: ``share_previews = true`` adds small
example crops of one test scan. The test split is touched here only, once per run, after all training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from client.evaluation import crop_preview, score_scan
from client.pairs import PreparedSite
from client.personal import scoring_head
from client.tasks.base import LocalTask, RoundJob

#: The model name of a site's interpolation baseline in the scores.
INTERPOLATION = "interpolation"


def describe(site: PreparedSite) -> dict:
    """What the run's report shows of a site: no scan, path or patient id, only its settings and counts.
    ``train_examples``: the size of its training split as its train replies count it (``num-examples``), which the
    coordinator holds those replies to."""
    config = site.config
    return {
        "modality": config.modality,
        "scanner": config.scanner,
        "acquisition": site.profile.name,
        "noise_level": site.profile.noise_level if site.profile.noise != "none" else 0.0,
        "supervision": config.supervision,
        "baseline": site.pairing.baseline_method,
        "scans": {split: counts["scans"] for split, counts in site.split_counts.items()},
        "patients": {split: counts["patients"] for split, counts in site.split_counts.items()},
        "train_examples": int(site.pairing.num_examples(site.train)),
        "shares_local_model": config.share_local_model,
        "shares_previews": config.share_previews,
        "test_note": site.test_note,
    }


def score_models(
    task: LocalTask, model: nn.Module, site: PreparedSite, job: RoundJob, models: Mapping[str, dict[str, torch.Tensor]]
) -> tuple[dict[str, dict[str, list[float]]], dict[str, np.ndarray] | None]:
    """Per-scan scores of every model in ``models`` (and of the interpolation) on the site's test pairs.

    Returns ``({model: {metric: [one value per test scan]}}, previews)``; the scan order is the same for every
    model. ``previews`` (crops of the first test scan) only when the site shares them, else None. A site without
    test scans returns no scores. With ``personal = "head"`` each model is scored with the site's own head for it
    (:func:`client.personal.scoring_head`).
    """
    if not site.test:
        return {}, None
    first: dict[str, np.ndarray] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    for name, weights in models.items():
        task.load_global(model, weights, site, job)
        scoring_head(model, weights, site, job)
        volumes = [site.pairing.restore(model, pair, device=job.torch_device) for pair in site.test]
        scores[name] = _per_scan(volumes, site, job)
        first[name] = volumes[0]
    interpolated = [site.pairing.interpolate(pair) for pair in site.test]
    scores[INTERPOLATION] = _per_scan(interpolated, site, job)
    previews = crop_preview(site.test[0], first, interpolated[0]) if site.config.share_previews else None
    return scores, previews


def _per_scan(volumes: Sequence[np.ndarray], site: PreparedSite, job: RoundJob) -> dict[str, list[float]]:
    """{metric: [value per test scan]} of the restored ``volumes`` (one per test pair, in order)."""
    rows = [
        score_scan(volume, pair, site.pairing, site.profile, max_slices=job.eval_max_slices)
        for volume, pair in zip(volumes, site.test, strict=True)
    ]
    return {metric: [float(row[metric]) for row in rows] for metric in rows[0]}


def pooled_site(sites: Sequence[PreparedSite]) -> PreparedSite:
    """One site holding every site's training pairs (each made with its own scanner's acquisition model): what a
    model trained on the pooled data sees. Simulation only; named ``pooled``."""
    if not sites:
        raise ValueError("the pooled baseline needs at least one site")
    pairs = tuple(pair for site in sites for pair in site.train)
    return dataclasses.replace(sites[0], name="pooled", train=pairs)
