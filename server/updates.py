"""Checking a site's model update before it may enter the aggregate.

A reply whose weights do not fit the global model (missing/extra keys, wrong shapes, non-float data) or that
carries NaN/Inf would poison every site's model; it is dropped with a message naming the site and the problem.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict


def update_problem(content: RecordDict, reference: ArrayRecord) -> str | None:
    """Why this reply's weights cannot be aggregated against ``reference`` (the global model), or None."""
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    arrays = next(iter(content.array_records.values()))
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"weights do not match the global model (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, expected in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(expected.shape):
            return f"{key}: shape {tuple(got.shape)}, the global model has {tuple(expected.shape)}"
        values = got.numpy()
        if values.dtype.kind != "f":
            return f"{key}: dtype {values.dtype} is not floating point"
        if not np.isfinite(values).all():
            return f"{key}: contains NaN or Inf"
    metrics = next(iter(content.metric_records.values()))
    examples = metrics.get("num-examples")
    if not isinstance(examples, int | float) or isinstance(examples, bool) or examples <= 0:
        return f"num-examples must be a positive number, got {examples!r}"
    return None
