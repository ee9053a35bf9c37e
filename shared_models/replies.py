"""The metric keys of the sites' replies, declared once: the coordinator checks every reply against them and the
sites must send exactly them.

A ``train`` reply's MetricRecord carries :data:`TRAIN_METRICS`, plus :data:`LOCAL_DP_METRICS` when the run's ``dp``
is ``local``, :data:`ADAPTIVE_CLIPPING_METRICS` with ``dp-clipping = "client-adaptive"`` and the family's own (its registry
entry's ``train_metrics``). An ``evaluate`` reply's carries :data:`EVALUATE_METRICS`. A reply with a key missing or
one more is rejected by the coordinator (``server.updates``): Flower's aggregation needs every reply of a round to
carry the same keys. A site that adds or drops a key updates this module in the same change.

Units: ``*-seconds`` in seconds, ``psnr`` in dB, counts as numbers; ``num-examples`` weights the site in the
average (train: its training examples, ``Pairing.num_examples``; evaluate: its scored validation slices).
"""

from __future__ import annotations

from shared_models.registry import family

#: Every train reply: the example count that weights the site, the local loss (mean over the last quarter of its
#: steps), patches seen, wall time and the files the site could not read.
TRAIN_METRICS = ("num-examples", "train-loss", "train-patches", "train-seconds", "skipped-files")
#: DP-SGD at the site (``dp = "local"``, client/privacy.py): clipping statistics and the spend of the round.
LOCAL_DP_METRICS = ("dp-clipped-fraction", "dp-units-per-step", "dp-epsilon", "dp-delta", "dp-noise-multiplier",
                    "dp-sample-rate", "dp-units", "dp-clip-norm", "dp-patient-unit")
#: Flower's ``adaptiveclipping_mod`` (central DP, client-side adaptive clipping) reports whether it clipped the
#: update under Flower's ``KEY_NORM_BIT`` (this module imports no Flower).
ADAPTIVE_CLIPPING_METRICS = ("norm_bit",)
#: The image metrics of a validation score (client/evaluation.py), each also of the interpolation baseline.
IMAGE_METRICS = ("psnr", "ssim", "nrmse", "hfen")
#: Every evaluate reply: the model's and the baseline's scores, what was scored, wall time, the example count
#: (the scored slices) and the files the site could not read.
EVALUATE_METRICS = (*IMAGE_METRICS, *(f"baseline-{key}" for key in IMAGE_METRICS), "num-val-scans",
                    "num-val-slices", "eval-seconds", "num-examples", "skipped-files")
#: Every per-scan list of a cross-site ``scores:MODEL`` record (``evaluate.cross``, client/evaluation.score_scan).
SCAN_METRICS = (*IMAGE_METRICS, "dc-error", "hf-excess")


def train_metric_keys(model: str, dp: str, dp_clipping: str) -> frozenset[str]:
    """The exact keys of a train reply of a run of family ``model`` with these ``dp`` / ``dp-clipping`` settings."""
    keys = set(TRAIN_METRICS) | set(family(model).train_metrics)
    if dp == "local":
        keys |= set(LOCAL_DP_METRICS)
    if dp == "central" and dp_clipping == "client-adaptive":
        keys |= set(ADAPTIVE_CLIPPING_METRICS)
    return frozenset(keys)

