"""Checking every site reply before the coordinator uses it, rule by rule.

One wrong site must not ruin the global model: a NaN, an Inf or an absurd example count in one reply would make
the weighted average non-finite or let that site replace the model, and a reply whose records or metric keys
differ from the others' makes Flower's aggregation raise and end the run. Each check below names the rule it
enforces (:data:`RULES`, the ``rule`` of a ``rejected`` row in metrics.jsonl) and a reason naming the problem;
the caller (``server.strategies``) drops that reply, never the round.

- ``records``: a train reply holds exactly one ArrayRecord and one MetricRecord, an evaluate reply one MetricRecord.
- ``keys``, ``shape``: the weights are exactly the global model's keys, each of the global array's shape.
- ``dtype``: each array has the global array's dtype (float32), or float16 when the run's ``transfer-dtype`` is
  float16; accepted float16 weights are cast to float32 before anything else reads them.
- ``metric-keys``: the metric keys are exactly those ``shared_models.replies`` declares for the run, each one
  number.
- ``num-examples``: a finite positive number, at most ``max-num-examples`` and, for a train reply, at most the
  training examples the site reported when it described itself (its ``train_examples``; no per-site cap when it
  reported none).
- ``non-finite``: every weight and every metric is finite.
- ``norm``: the distance of a site's weights from the global ones, ``d_i = ||w_i - w_global||_2`` over every
  weight, at most ``update-norm-limit`` times the median distance of the round's OTHER accepted replies
  (:func:`norm_rejections`).
- ``aggregate``: not a reply's rule: the round's aggregate itself is non-finite (``server.strategies``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from server.settings import RunSettings
from shared_models.replies import EVALUATE_METRICS, SCAN_METRICS, train_metric_keys

RULES = ("records", "keys", "shape", "dtype", "non-finite", "num-examples", "metric-keys", "norm", "aggregate")
#: The metric that weights a site in the average (Flower's ``weighted_by_key``).
NUM_EXAMPLES = "num-examples"
#: The prefix of a cross-site reply's per-model score records (``scores:MODEL``, server.cross_site).
SCORES_PREFIX = "scores:"


@dataclass(frozen=True)
class Rejection:
    """Why a reply (or an aggregate) is not used: the ``rule`` (one of :data:`RULES`) and a ``reason`` naming the
    problem (key, value, limit)."""

    rule: str
    reason: str


@dataclass(frozen=True)
class ReplyRules:
    """What a run accepts in a reply.

    ``train_metrics`` / ``evaluate_metrics``: the exact metric keys (None: not checked); ``max_num_examples``: the
    absolute cap on ``num-examples``; ``norm_limit``: the ``norm`` rule's multiple of the median distance (0: off);
    ``transfer_dtype``: ``float16`` also accepts float16 weights.
    """

    train_metrics: frozenset[str] | None = None
    evaluate_metrics: frozenset[str] | None = None
    max_num_examples: float = 10_000_000
    norm_limit: float = 0.0
    transfer_dtype: str = "float32"

    @classmethod
    def from_settings(cls, settings: RunSettings) -> ReplyRules:
        """The rules of a run with ``settings`` (its family, DP mode, limits and transfer dtype)."""
        return cls(train_metric_keys(settings.model, settings.dp, settings.dp_clipping), frozenset(EVALUATE_METRICS),
                   settings.max_num_examples, settings.update_norm_limit, settings.transfer_dtype)


def train_rejection(
    content: RecordDict, reference: ArrayRecord, rules: ReplyRules, train_examples: float | None = None
) -> Rejection | None:
    """Why the train reply ``content`` cannot be aggregated against the global weights ``reference``, or None.

    ``train_examples``: what the site said it has (None: no per-site cap). On acceptance, float16 weights in
    ``content`` have been replaced by their values in the global model's dtype (float32; the record keeps its key),
    so that whatever reads the reply next aggregates in float32.
    """
    found = _record_counts(content, arrays=1)
    if found:
        return found
    key = next(iter(content.array_records))
    rejection = _weights_rejection(content.array_records[key], reference, rules.transfer_dtype)
    if rejection:
        return rejection
    metrics = next(iter(content.metric_records.values()))
    rejection = _metrics_rejection(metrics, rules.train_metrics, rules.max_num_examples, train_examples)
    if rejection:
        return rejection
    values = {name: array.numpy().astype(reference[name].dtype, copy=False) for name, array in content[key].items()}
    for name, value in values.items():
        if not np.isfinite(value).all():
            return Rejection("non-finite", f"{name}: contains NaN or Inf")
    if any(array.dtype != reference[name].dtype for name, array in content[key].items()):
        content[key] = ArrayRecord({name: Array(value) for name, value in values.items()})
    return None


def evaluate_rejection(content: RecordDict, rules: ReplyRules) -> Rejection | None:
    """Why the evaluate reply ``content`` cannot be recorded and averaged, or None (its ``num-examples``, the
    scored slices, is capped by ``max-num-examples`` only)."""
    found = _record_counts(content, arrays=None)
    return found or _metrics_rejection(next(iter(content.metric_records.values())), rules.evaluate_metrics,
                                       rules.max_num_examples, None)


def scores_rejection(content: RecordDict) -> Rejection | None:
    """Why the ``scores:MODEL`` records of a cross-site reply (``evaluate.cross``) cannot be used, or None: each
    holds exactly the per-scan metrics of ``shared_models.replies.SCAN_METRICS``, lists of one finite number per
    test scan, of one length throughout the reply (the same scans for every model)."""
    lengths = set()
    for name, record in content.metric_records.items():
        if not name.startswith(SCORES_PREFIX):
            continue
        if set(record) != set(SCAN_METRICS):
            return Rejection("metric-keys", f"{name}: metrics {sorted(record)}, expected {sorted(SCAN_METRICS)}")
        for metric, values in record.items():
            if not isinstance(values, list):
                return Rejection("metric-keys", f"{name}: {metric} is {values!r}, expected one value per test scan")
            if not all(math.isfinite(v) for v in values):
                return Rejection("non-finite", f"{name}: {metric} contains NaN or Inf")
            lengths.add(len(values))
    if len(lengths) > 1:
        return Rejection("shape", f"per-scan lists of different lengths {sorted(lengths)}: one value per test scan "
                                  "is expected for every model")
    return None


def update_problem(content: RecordDict, reference: ArrayRecord) -> str | None:
    """Why this reply's weights cannot be used against ``reference`` (the global model), or None: the train
    reply's rules without the run's metric keys, caps and norm (a baseline's weights, which nothing averages).
    float16 weights (a site's under ``transfer-dtype = "float16"``) are accepted and cast to float32 in ``content``."""
    rejection = train_rejection(content, reference, ReplyRules(transfer_dtype="float16"))
    return rejection.reason if rejection else None


def update_distances(updates: Sequence[ArrayRecord], reference: ArrayRecord) -> list[float]:
    """``||w_i - w_global||_2`` of each of ``updates`` over every array of ``reference`` (summed in float64)."""
    base = {key: array.numpy().astype(np.float64) for key, array in reference.items()}
    return [math.sqrt(sum(float(np.square(update[key].numpy() - value).sum()) for key, value in base.items()))
            for update in updates]


def norm_rejections(distances: Sequence[float], limit: float) -> list[Rejection | None]:
    """The ``norm`` rule over one round's replies, given their distances from the global weights.

    Reply i is rejected when ``d_i > limit * median(d_j, j != i)``: the median of the OTHER replies (leave one out),
    so that the site being judged cannot pull the threshold up, and the rule works with the 2-4 sites a
    federation of hospitals has (with two, each is compared with the other: one 100 times further away is
    rejected, the other kept). Honest sites' distances differ by their data and scanner, a few-fold at most;
    a scaled or random update is orders of magnitude away. Off when ``limit`` is 0; a reply with no other to
    compare with, or whose others did not move at all (median 0), is kept.
    """
    verdicts: list[Rejection | None] = []
    for index, distance in enumerate(distances):
        others = [d for j, d in enumerate(distances) if j != index]
        median = float(np.median(others)) if others else 0.0
        if limit > 0 and median > 0 and distance > limit * median:
            verdicts.append(Rejection("norm", f"its weights are {distance:.4g} from the global ones, "
                                              f"{distance / median:.3g} times the median {median:.4g} of the other "
                                              f"sites (update-norm-limit {limit:g})"))
        else:
            verdicts.append(None)
    return verdicts


def all_finite(arrays: ArrayRecord) -> bool:
    """Whether every value of ``arrays`` is finite."""
    return all(np.isfinite(array.numpy()).all() for array in arrays.values())


# ------------------------------------------------------------------------------------------------------ the rules
def _record_counts(content: RecordDict, arrays: int | None) -> Rejection | None:
    """The ``records`` rule: ``arrays`` ArrayRecords (None: any number) and one MetricRecord."""
    if arrays is not None and len(content.array_records) != arrays:
        return Rejection("records", f"expected one ArrayRecord, got {len(content.array_records)}")
    if len(content.metric_records) != 1:
        return Rejection("records", f"expected one MetricRecord, got {len(content.metric_records)}")
    return None


def _weights_rejection(arrays: ArrayRecord, reference: ArrayRecord, transfer_dtype: str) -> Rejection | None:
    """The ``keys``, ``shape`` and ``dtype`` rules of a reply's weights against the global ones."""
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return Rejection("keys", f"weights do not match the global model (missing {missing[:3]}, unexpected "
                                 f"{extra[:3]})")
    for key, expected in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(expected.shape):
            return Rejection("shape", f"{key}: shape {tuple(got.shape)}, the global model has {tuple(expected.shape)}")
        allowed = {expected.dtype, "float16"} if transfer_dtype == "float16" else {expected.dtype}
        if got.dtype not in allowed:
            kind = " or ".join(sorted(allowed)) if got.dtype.startswith("float") else "floating point"
            return Rejection("dtype", f"{key}: dtype {got.dtype} is not {kind} (transfer-dtype {transfer_dtype})")
    return None


def _metrics_rejection(
    metrics: MetricRecord, expected: frozenset[str] | None, max_examples: float, train_examples: float | None
) -> Rejection | None:
    """The ``metric-keys``, ``num-examples`` and (for the metrics) ``non-finite`` rules."""
    if expected is not None and set(metrics) != expected:
        missing, extra = sorted(expected - set(metrics)), sorted(set(metrics) - expected)
        return Rejection("metric-keys", f"metrics do not match what the run expects (missing {missing}, unexpected "
                                        f"{extra}; see shared_models/replies.py)")
    examples = metrics.get(NUM_EXAMPLES)
    if not isinstance(examples, int | float) or isinstance(examples, bool) or not math.isfinite(examples) \
            or examples <= 0:
        return Rejection("num-examples", f"num-examples must be a positive number, got {examples!r}")
    if examples > max_examples:
        return Rejection("num-examples", f"num-examples {examples:g} is above max-num-examples {max_examples:g}")
    if train_examples is not None and examples > train_examples:
        return Rejection("num-examples", f"num-examples {examples:g} is above the {train_examples:g} training "
                                         "examples the site reported")
    for key, value in metrics.items():
        if isinstance(value, list):
            return Rejection("metric-keys", f"metric {key} is a list, expected one number")
        if not math.isfinite(value):
            return Rejection("non-finite", f"metric {key} is {value}")
    return None

