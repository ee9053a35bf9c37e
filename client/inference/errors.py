"""The error ``fedsr infer`` raises for a model, scan or output path it cannot use."""

from __future__ import annotations

from shared_models.errors import ExplainedError


class InferenceError(ExplainedError, ValueError):
    """A model that does not fit a scan, or an output that may not be written: the message names the file, what is
    wrong and what to do."""
