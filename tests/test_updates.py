"""Update validation: a reply that does not fit the global model is named and refused."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from server.updates import update_problem


@pytest.fixture
def reference() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(torch.nn.Conv2d(1, 4, 3).state_dict())


def reply(arrays: dict, examples=10) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": examples})})


def test_a_matching_update_passes(reference):
    assert update_problem(reply(reference.to_torch_state_dict()), reference) is None


def test_wrong_shape_is_named(reference):
    weights = reference.to_torch_state_dict()
    weights["weight"] = torch.zeros(4, 1, 5, 5)
    assert update_problem(reply(weights), reference) == "weight: shape (4, 1, 5, 5), the global model has (4, 1, 3, 3)"


def test_missing_and_extra_keys_are_named(reference):
    weights = reference.to_torch_state_dict()
    weights["extra.bias"] = weights.pop("bias")
    problem = update_problem(reply(weights), reference)
    assert "missing ['bias']" in problem and "unexpected ['extra.bias']" in problem


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused(reference, bad):
    weights = reference.to_torch_state_dict()
    weights["bias"][1] = bad
    assert update_problem(reply(weights), reference) == "bias: contains NaN or Inf"


def test_integer_weights_and_bad_example_counts_are_refused(reference):
    weights = reference.to_torch_state_dict()
    weights["bias"] = weights["bias"].to(torch.int32)
    assert "not floating point" in update_problem(reply(weights), reference)
    assert "num-examples must be a positive number" in update_problem(reply(reference.to_torch_state_dict(), 0), reference)


def test_a_reply_without_weights_is_refused(reference):
    content = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    assert update_problem(content, reference) == "expected one ArrayRecord, got 0"
