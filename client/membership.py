"""An empirical check of what a model gives away about who it was trained on: a membership-inference attack.

The loss-threshold attack (Yeom et al. 2018) guesses that a slice was in the training data when the model's error
on it is low. At a site, after training, the site scores the final global model on every scored slice of its
training patients (members) and of its test patients (never trained on: non-members) and measures how well that
error tells the two apart: the AUC of the ranking (Mann-Whitney U / (members x non-members); 0.5 = no better than
chance) and the attack's best advantage (max over thresholds of true-positive minus false-positive rate). Only
these numbers leave the site, in the cross-site evaluation's reply. Differential privacy bounds the advantage of
any attack (by e^epsilon - 1 for epsilon-DP, meaningful for small epsilon); this shows what a simple attacker gets.
Members and non-members differ in patients as well as in membership, so part of any gap is patient variation:
read the AUC against a no-DP run on the same sites, not against 0.5 alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import mannwhitneyu
from torch import nn

from client.pairs import PreparedSite, ScanPair
from client.tasks.base import RoundJob

#: The reply's record of the attack's numbers (the cross-site evaluation, for the ``global`` model).
MEMBERSHIP = "membership"


def slice_errors(model: nn.Module, pairs: Sequence[ScanPair], site: PreparedSite, job: RoundJob) -> np.ndarray:
    """The model's mean absolute error (normalised intensity) on every scored slice of ``pairs``."""
    errors: list[float] = []
    for pair in pairs:
        output, truth = site.pairing.restored(model, pair, device=job.torch_device, max_slices=job.eval_max_slices)
        errors += (output.float() - truth.float()).abs().flatten(1).mean(1).tolist()
    return np.asarray(errors)


def loss_threshold_attack(members: np.ndarray, non_members: np.ndarray) -> dict[str, float]:
    """AUC and best advantage of guessing "member" for low error; the counts of slices on each side."""
    auc = mannwhitneyu(-members, -non_members).statistic / (len(members) * len(non_members))
    thresholds = np.concatenate([members, non_members])
    advantage = max(float(np.mean(members <= t) - np.mean(non_members <= t)) for t in thresholds)
    return {"mia-auc": float(auc), "mia-advantage": advantage, "mia-members": len(members),
            "mia-non-members": len(non_members)}


def membership_attack(model: nn.Module, site: PreparedSite, job: RoundJob) -> dict[str, float] | None:
    """The attack on ``model`` (weights loaded) with the site's training and test patients; None without test
    patients."""
    if not site.test:
        return None
    model.eval()
    with torch.no_grad():
        return loss_threshold_attack(slice_errors(model, site.train, site, job),
                                     slice_errors(model, site.test, site, job))
