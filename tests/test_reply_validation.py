"""Every reply is checked before it is used (server/updates.py, through server.strategies.SiteStrategy): each rule
rejects its bad reply, in train and evaluate alike, the good replies of the same round are aggregated as if the bad
one had never come, and the rejection is logged, recorded and counted. Real Flower messages, no Flower mocks."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from server.run_log import RunRecorder
from server.settings import RunSettings
from server.sites import FederationError
from server.strategies import SiteStrategy
from server.updates import ReplyRules, norm_rejections, scores_rejection, train_rejection, update_problem
from shared_models.replies import EVALUATE_METRICS, SCAN_METRICS, TRAIN_METRICS

SHAPES = {"body.weight": (4, 1, 3, 3), "body.bias": (4,)}
GLOBAL = {key: np.random.default_rng(0).normal(size=shape).astype(np.float32) for key, shape in SHAPES.items()}
GOOD_SITES = {"site-a": 10, "site-b": 20, "site-c": 30}  # name: num-examples
BAD_SITE = "site-d"


@pytest.fixture(autouse=True)
def coordinator(monkeypatch):
    """Messages take their run from the process's task identity, which a ServerApp process sets at its start."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def trained(seed: int) -> dict[str, np.ndarray]:
    """A site's weights after a round: the global ones moved by a small step of their own."""
    rng = np.random.default_rng(seed)
    return {key: (value + 0.01 * rng.normal(size=value.shape)).astype(np.float32) for key, value in GLOBAL.items()}


def reply(site: str, node: int, message_type: str, records: dict) -> Message:
    """``site``'s reply (from node ``node``) to a ``message_type`` message, holding ``records``."""
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), message_type=message_type,
                   dst_node_id=node)
    return Message(RecordDict({**records, "site": ConfigRecord({"name": site})}), reply_to=sent)


def train_records(weights: dict[str, np.ndarray], examples: float = 10) -> dict:
    metrics = {"num-examples": examples, "train-loss": 0.1, "train-patches": 8, "train-seconds": 0.5,
               "skipped-files": 0}
    return {"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}), "metrics": MetricRecord(metrics)}


def evaluate_records(psnr: float, examples: float = 10) -> dict:
    metrics = {key: 0.5 for key in EVALUATE_METRICS} | {"psnr": psnr, "num-examples": examples}
    return {"metrics": MetricRecord(metrics)}


def strategy(tmp_path, **rules) -> SiteStrategy:
    return SiteStrategy(recorder=RunRecorder(tmp_path), reference=ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                        required_sites=2, experiment="global", node_wait_seconds=0,
                        rules=dataclasses.replace(ReplyRules.from_settings(RunSettings()), **rules))


def rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- train, rule by rule
def drop(key: str) -> Callable[[dict], None]:
    return lambda records: records["arrays"].pop(key)


def set_weight(key: str, value) -> Callable[[dict], None]:
    def change(records: dict) -> None:
        records["arrays"][key] = Array(np.asarray(value))
    return change


def set_metric(key: str, value) -> Callable[[dict], None]:
    def change(records: dict) -> None:
        records["metrics"][key] = value
    return change


def scaled(records: dict) -> None:
    """The site's update multiplied by 100 (global + 100 * (update - global))."""
    for key in SHAPES:
        update = records["arrays"][key].numpy()
        records["arrays"][key] = Array((GLOBAL[key] + 100 * (update - GLOBAL[key])).astype(np.float32))


TRAIN_CASES = {
    "no weights": ("records", lambda records: records.pop("arrays")),
    "two metric records": ("records", lambda records: records.update(more=MetricRecord({"x": 1.0}))),
    "missing key": ("keys", drop("body.bias")),
    "extra key": ("keys", set_weight("head.bias", np.zeros(4, np.float32))),
    "wrong shape": ("shape", set_weight("body.bias", np.zeros(5, np.float32))),
    "integers": ("dtype", set_weight("body.bias", np.zeros(4, np.int32))),
    "float16 without float16 transfer": ("dtype", set_weight("body.bias", np.zeros(4, np.float16))),
    "float64": ("dtype", set_weight("body.bias", np.zeros(4, np.float64))),
    "NaN weight": ("non-finite", set_weight("body.bias", np.array([0, np.nan, 0, 0], np.float32))),
    "Inf weight": ("non-finite", set_weight("body.bias", np.array([0, np.inf, 0, 0], np.float32))),
    "NaN examples": ("num-examples", set_metric("num-examples", float("nan"))),
    "Inf examples": ("num-examples", set_metric("num-examples", float("inf"))),
    "no examples": ("num-examples", set_metric("num-examples", 0)),
    "negative examples": ("num-examples", set_metric("num-examples", -5.0)),
    "absurd examples": ("num-examples", set_metric("num-examples", 1e12)),
    "missing metric": ("metric-keys", lambda records: records["metrics"].pop("train-loss")),
    "extra metric": ("metric-keys", set_metric("my-loss", 0.2)),
    "list metric": ("metric-keys", set_metric("train-loss", [0.1, 0.2])),
    "NaN loss": ("non-finite", set_metric("train-loss", float("nan"))),
    "scaled update": ("norm", scaled),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_each_rule_rejects_its_bad_train_reply_and_the_round_goes_on_with_the_others(tmp_path, caplog, case):
    rule, corrupt = TRAIN_CASES[case]
    bad = train_records(trained(9))
    corrupt(bad)
    replies = [reply(site, node, MessageType.TRAIN, train_records(trained(node), examples))
               for node, (site, examples) in enumerate(GOOD_SITES.items(), 1)]
    replies.insert(1, reply(BAD_SITE, 9, MessageType.TRAIN, bad))  # arrival order does not matter
    with caplog.at_level(logging.ERROR, logger="server.strategies"):
        arrays, _metrics = strategy(tmp_path, norm_limit=5.0).aggregate_train(3, replies)

    weights = np.array(list(GOOD_SITES.values()), dtype=np.float64)
    for key in SHAPES:  # FedAvg of the good replies alone, weighted by their num-examples
        expected = np.average([trained(node)[key] for node in (1, 2, 3)], axis=0, weights=weights)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    recorded = rows(tmp_path)
    assert sorted(r["site"] for r in recorded if r["phase"] == "train") == sorted(GOOD_SITES)
    (rejected,) = [r for r in recorded if r["phase"] == "rejected"]
    assert rejected["site"] == BAD_SITE and rejected["rule"] == rule and rejected["request"] == "train"
    assert rejected["round"] == 3 and rejected["experiment"] == "global" and rejected["reason"]
    (logged,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert all(word in logged for word in ("round 3", BAD_SITE, f"rule {rule}", rejected["reason"]))


def test_float16_weights_are_accepted_with_float16_transfer_and_aggregated_as_float32(tmp_path):
    half = {key: value.astype(np.float16) for key, value in trained(1).items()}
    replies = [reply("site-a", 1, MessageType.TRAIN, train_records(half)),
               reply("site-b", 2, MessageType.TRAIN, train_records(trained(2)))]
    arrays, _ = strategy(tmp_path, transfer_dtype="float16").aggregate_train(1, replies)
    for key in SHAPES:
        assert arrays[key].dtype == "float32"
        expected = (half[key].astype(np.float32) + trained(2)[key]) / 2  # float16 -> float32 is exact
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)


def test_num_examples_above_what_the_site_reported_is_rejected():
    rules = ReplyRules.from_settings(RunSettings())
    reference = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    content = RecordDict(train_records(trained(1), examples=12))
    assert train_rejection(content, reference, rules, train_examples=12) is None
    rejection = train_rejection(content, reference, rules, train_examples=11)
    assert rejection.rule == "num-examples" and "11 training examples the site reported" in rejection.reason


def test_too_few_usable_replies_stop_the_round_naming_the_sites(tmp_path):
    bad = train_records(trained(1))
    bad["metrics"]["num-examples"] = float("nan")
    replies = [reply("site-a", 1, MessageType.TRAIN, bad), reply("site-b", 2, MessageType.TRAIN,
                                                                 train_records(trained(2)))]
    with pytest.raises(FederationError, match="only 1 of 2 site.*2 required.*from: site-a .*rejections"):
        strategy(tmp_path).aggregate_train(1, replies)


# ---------------------------------------------------------------------------------------------------- evaluate
EVALUATE_CASES = {
    "no metrics": ("records", lambda records: records.pop("metrics")),
    "missing metric": ("metric-keys", lambda records: records["metrics"].pop("ssim")),
    "extra metric": ("metric-keys", set_metric("my-score", 1.0)),
    "NaN score": ("non-finite", set_metric("psnr", float("nan"))),
    "NaN examples": ("num-examples", set_metric("num-examples", float("nan"))),
    "absurd examples": ("num-examples", set_metric("num-examples", 1e12)),
}


@pytest.mark.parametrize("case", EVALUATE_CASES)
def test_each_rule_rejects_its_bad_evaluate_reply_and_the_others_are_averaged(tmp_path, case):
    rule, corrupt = EVALUATE_CASES[case]
    bad = evaluate_records(99.0)
    corrupt(bad)
    psnrs = {"site-a": 30.0, "site-b": 32.0, "site-c": 35.0}
    replies = [reply(site, node, MessageType.EVALUATE, evaluate_records(psnrs[site], GOOD_SITES[site]))
               for node, site in enumerate(psnrs, 1)] + [reply(BAD_SITE, 9, MessageType.EVALUATE, bad)]
    metrics = strategy(tmp_path).aggregate_evaluate(2, replies)
    assert metrics["psnr"] == pytest.approx(np.average(list(psnrs.values()), weights=list(GOOD_SITES.values())))
    recorded = rows(tmp_path)
    assert sorted(r["site"] for r in recorded if r["phase"] == "evaluate") == sorted(psnrs)
    (rejected,) = [r for r in recorded if r["phase"] == "rejected"]
    assert (rejected["site"], rejected["rule"], rejected["request"]) == (BAD_SITE, rule, "evaluate")


# ---------------------------------------------------------------------------------------------- the norm rule
def test_the_norm_rule_compares_each_site_with_the_median_of_the_others():
    # two sites: each is judged against the other; the far one goes, the near one stays
    assert [r and r.rule for r in norm_rejections([1.0, 100.0], 5.0)] == [None, "norm"]
    # four sites, two of them far away: the honest ones' threshold is not pulled up by themselves
    verdicts = norm_rejections([1.0, 1.3, 40.0, 0.9], 5.0)
    assert [r is None for r in verdicts] == [True, True, False, True]
    assert "times the median" in verdicts[2].reason and "update-norm-limit 5" in verdicts[2].reason
    assert norm_rejections([1.0, 100.0], 0.0) == [None, None]  # off
    assert norm_rejections([3.0], 5.0) == [None]  # nothing to compare with
    assert norm_rejections([0.0, 0.0, 2.0], 5.0) == [None, None, None]  # the others did not move: no yardstick


# --------------------------------------------------------------------------------------- cross-site and baselines
def scores(**overrides) -> RecordDict:
    per_scan = {metric: [0.1, 0.2, 0.3] for metric in SCAN_METRICS}
    return RecordDict({"scores:global": MetricRecord({**per_scan, **overrides}),
                       "scores:interpolation": MetricRecord(per_scan)})


def test_cross_site_scores_must_be_finite_complete_and_per_scan():
    assert scores_rejection(scores()) is None
    assert scores_rejection(scores(psnr=[0.1, float("nan"), 0.3])).rule == "non-finite"
    assert scores_rejection(scores(psnr=[0.1, 0.2])).rule == "shape"
    assert scores_rejection(scores(extra=[0.1, 0.2, 0.3])).rule == "metric-keys"
    assert scores_rejection(scores(psnr=0.1)).rule == "metric-keys"


def test_a_baselines_float16_weights_are_accepted_and_cast_to_float32():
    content = RecordDict(train_records({key: value.astype(np.float16) for key, value in trained(1).items()}))
    assert update_problem(content, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})) is None
    assert all(array.dtype == "float32" for array in content["arrays"].values())


def test_the_declared_keys_are_those_the_sites_send():
    from client.evaluation import METRIC_KEYS
    from client.evaluation import SCAN_METRICS as CLIENT_SCAN_METRICS

    assert set(METRIC_KEYS) < set(EVALUATE_METRICS) and CLIENT_SCAN_METRICS == SCAN_METRICS
    assert "num-examples" in TRAIN_METRICS
