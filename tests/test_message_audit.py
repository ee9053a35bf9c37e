"""What leaves a site, audited: every reply every site sends during a whole run (describe, federated rounds, the
local-only baseline, the cross-site evaluation, an error) holds only the travelling weights, numbers, the site's
display name and description, crops where the site consents, and error categories.

One run on Flower's simulation engine: a site that consents to share its local model and previews (a phantom
site), one that keeps them at home, and one whose folder holds only a corrupt scan named like a patient. Then the
audit itself must catch what it is there to catch, on copies of the run's real replies with one thing changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from message_audit import audit, run_recorded, travelling_arrays
from server.settings import RunSettings
from simulation.phantoms import write_phantom_sites
from test_cross_site import keep_at_home
from test_site_errors import PATIENT, SCAN, broken_site


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    sites = root / "sites"
    good = write_phantom_sites(sites, n_sites=2, subjects_per_site=5, shape=(48, 48, 16), seed=11)
    keep_at_home(good[1])
    folders = [broken_site(sites / "site-0-broken"), *good]
    settings = RunSettings(num_rounds=1, num_sites=3, min_sites=1, local_steps=4, batch_size=4, patch_size=32,
                           eval_max_slices=4, baselines="local", run_dir=str(root / "run"), sites_dir=str(sites))
    replies = run_recorded(settings, folders)
    forbidden = [PATIENT, SCAN, folders[0].name]
    for folder in folders:
        forbidden.append(str(folder))
        for scan in folder.glob("*.nii.gz"):
            forbidden += [scan.name, scan.name.removesuffix(".nii.gz")]  # file names and their subject ids
    return {"replies": replies, "arrays": travelling_arrays(settings), "forbidden": forbidden,
            "path": str(good[0]), "sharing": good[0].name, "home": good[1].name}


def test_the_message_audit_of_a_whole_run_finds_nothing(audited_run):
    assert audit(audited_run["replies"], audited_run["arrays"], audited_run["forbidden"]) == []


def test_every_kind_of_reply_was_audited(audited_run):
    kinds = {(reply.metadata.message_type, reply.has_error()) for reply in audited_run["replies"]}
    assert kinds == {("query.describe", False), ("query.describe", True), ("train", False), ("evaluate", False),
                     ("train.local", False), ("evaluate.cross", False)}


def test_only_the_consenting_site_sends_its_local_model_and_previews(audited_run):
    def records(kind: str, site: str) -> set[str]:
        (reply,) = [r for r in audited_run["replies"] if r.metadata.message_type == kind and not r.has_error()
                    and r.content.config_records["site"]["name"] == site]
        return set(reply.content.array_records)

    assert records("train.local", audited_run["sharing"]) == {"arrays"}
    assert records("evaluate.cross", audited_run["sharing"]) == {"previews"}
    assert records("train.local", audited_run["home"]) == set()
    assert records("evaluate.cross", audited_run["home"]) == set()


# -------------------------------------------------------------------- the audit catches what it is there for
def changed(audited_run, kind: str, change: Callable[[RecordDict], None]) -> list[str]:
    """The audit of the run with the first ``kind`` reply replaced by a copy whose content ``change`` edits."""
    replies = list(audited_run["replies"])
    index = next(i for i, r in enumerate(replies) if r.metadata.message_type == kind and not r.has_error())
    content = RecordDict(dict(replies[index].content.items()))
    change(content)
    replies[index] = Message(metadata=replies[index].metadata, content=content)
    return audit(replies, audited_run["arrays"], audited_run["forbidden"])


def test_the_audit_catches_a_path_in_a_description(audited_run):
    def leak(content: RecordDict) -> None:
        said = dict(content.config_records["site"])
        about = json.loads(str(said["about"]))
        about["scanner"] = audited_run["path"]
        content["site"] = ConfigRecord({**said, "about": json.dumps(about)})

    assert any("sends" in problem for problem in changed(audited_run, "query.describe", leak))


def test_the_audit_catches_a_weight_that_is_not_the_models(audited_run):
    def extra(content: RecordDict) -> None:
        arrays = dict(content.array_records["arrays"].items())
        content["arrays"] = ArrayRecord({**arrays, "extra": Array(np.zeros((2, 2), np.float32))})

    assert any("travelling weights" in problem for problem in changed(audited_run, "train", extra))


def test_the_audit_catches_a_text_metric_and_an_extra_record(audited_run):
    def text(content: RecordDict) -> None:
        content["notes"] = ConfigRecord({"patient": "x"})
        content["metrics"] = MetricRecord({"psnr": [1.0, 2.0]})

    problems = changed(audited_run, "evaluate", text)
    assert any("'notes'" in problem for problem in problems) and any("psnr" in problem for problem in problems)


def test_the_audit_catches_previews_from_a_site_that_keeps_them(audited_run):
    replies = list(audited_run["replies"])
    source = next(r for r in replies if r.metadata.message_type == "evaluate.cross" and not r.has_error()
                  and "previews" in r.content.array_records)
    home = next(r for r in replies if r.metadata.message_type == "evaluate.cross" and not r.has_error()
                and r.content.config_records["site"]["name"] == audited_run["home"])
    content = RecordDict({**dict(home.content.items()), "previews": source.content.array_records["previews"]})
    replies[replies.index(home)] = Message(metadata=home.metadata, content=content)
    problems = audit(replies, audited_run["arrays"], audited_run["forbidden"])
    assert any("previews" in problem for problem in problems)


def test_the_audit_catches_an_error_reason_with_the_exception_text(audited_run):
    replies = list(audited_run["replies"])
    index = next(i for i, r in enumerate(replies) if r.has_error())
    flower_words = f"<class 'client.data.errors.SiteError'>:<'{audited_run['path']}: no usable scan'>"
    replies[index] = Message(metadata=replies[index].metadata, error=Error(code=2, reason=flower_words))
    problems = audit(replies, audited_run["arrays"], audited_run["forbidden"])
    assert any("category format" in problem for problem in problems)
    assert any("sends" in problem for problem in problems)
