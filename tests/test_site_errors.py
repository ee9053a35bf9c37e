"""Nothing identifying leaves a site in an error: the coordinator gets a category and a fixed sentence, the site's
own log keeps the detail.

A real federation on Flower's simulation engine: one site folder holds only a corrupt scan whose file name looks
like a patient's (``DOE_JOHN_12345.nii.gz``), and a second site's training, local baseline and cross-site
evaluation raise a :class:`SiteError` naming a file of its folder and a DICOM patient name. Then the scrubber and
the categories on real errors, one by one.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message

from client.data.errors import SiteError
from client.data.site import load_site
from client.policy import SiteRefusal
from client.safe_errors import CATEGORIES, MAX_DETAIL, PASS_THROUGH, category_of, reply_reason, scrub
from client.state import site_state_dir
from client.tasks.base import RoundJob
from message_audit import run_recorded
from server.settings import RunSettings
from simulation.phantoms import write_phantom_sites

PATIENT = "DOE_JOHN_12345"
SCAN = f"{PATIENT}.nii.gz"
DICOM_NAME = "DOE^JOHN"
#: The message types at which the second site fails.
FAILING = ("train", "train.local", "evaluate.cross")


def broken_site(folder: Path) -> Path:
    """A site folder whose only scan is not a NIfTI file, named like a patient."""
    folder.mkdir(parents=True)
    (folder / SCAN).write_bytes(b"not a nifti file " * 8)
    return folder


def keep_site_log(path: str, msg: Message, context: Context, call_next) -> Message:
    """Client mod: the site's error log (logger client.safe_errors) also goes to the file ``path``, in this
    worker process (Ray's), once."""
    logger = logging.getLogger("client.safe_errors")
    if not any(getattr(handler, "baseFilename", None) == path for handler in logger.handlers):
        logger.addHandler(logging.FileHandler(path))
    return call_next(msg, context)


def fail_at(folder: str, partition: int, msg: Message, context: Context, call_next) -> Message:
    """Client mod: the site of simulation ``partition`` raises an error naming a file of its ``folder`` and a
    patient's name at the :data:`FAILING` messages."""
    if context.node_config.get("partition-id") == partition and msg.metadata.message_type in FAILING:
        raise SiteError(Path(folder) / SCAN, f"PatientName {DICOM_NAME!r} does not match (read from {folder})",
                        f"re-export {SCAN} with its {PATIENT} header fixed")
    return call_next(msg, context)


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    sites = root / "sites"
    good = write_phantom_sites(sites, n_sites=2, subjects_per_site=5, shape=(48, 48, 16), seed=9)
    broken = broken_site(sites / "site-0-broken")  # partition 0; the good ones 1 and 2
    folders = [str(broken), *map(str, good)]
    site_log = root / "site.log"
    run_dir = root / "run"
    settings = RunSettings(num_rounds=1, num_sites=3, min_sites=1, local_steps=4, batch_size=4, patch_size=32,
                           eval_max_slices=4, baselines="local", run_dir=str(run_dir), sites_dir=str(sites))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("server", "flwr")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        replies = run_recorded(settings, folders, mods=[functools.partial(keep_site_log, str(site_log)),
                                                        functools.partial(fail_at, str(good[1]), 2)])
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    coordinator_log = [record.getMessage() for record in records]
    return {"broken": broken, "failing": good[1], "run_dir": run_dir, "log": coordinator_log,
            "replies": replies, "site_log": site_log.read_text()}


def test_an_error_reply_carries_no_path_or_file_name(failing_run):
    errors = [reply.error.reason for reply in failing_run["replies"] if reply.has_error()]
    assert len(errors) == 1 + len(FAILING)  # the broken site's describe, the failing site's three messages
    run_files = [path.read_text(errors="replace") for path in failing_run["run_dir"].rglob("*") if path.is_file()
                 and path.suffix in {".json", ".jsonl", ".toml", ".html"}]
    forbidden = [str(failing_run["broken"]), failing_run["broken"].name, str(failing_run["failing"] / SCAN), SCAN,
                 PATIENT, DICOM_NAME, "DOE"]
    for text in [*errors, *failing_run["log"], *run_files]:
        assert not [word for word in forbidden if word in text], text
    assert all(reason.startswith("site-data: ") for reason in errors), errors


def test_the_coordinator_logs_the_category_and_names_the_site(failing_run):
    name = failing_run["failing"].name  # its display name (the phantom's site.toml)
    failures = [line for line in failing_run["log"] if "site-data" in line]
    assert len([line for line in failures if name in line]) == len(FAILING), failures
    assert any("could not describe itself" in line for line in failures), failures
    summary = (failing_run["run_dir"] / "summary.json").read_text()
    assert name in summary  # the failing site still evaluates: only its failing messages are lost


def test_the_site_log_keeps_the_full_detail(failing_run):
    site_log = failing_run["site_log"]
    assert str(failing_run["broken"] / SCAN) in site_log  # the skipped file, named in the SiteError
    assert str(failing_run["failing"] / SCAN) in site_log and DICOM_NAME in site_log
    assert site_log.count("Traceback") == 1 + len(FAILING)


# ------------------------------------------------------------------------------------------------ the scrubber
@pytest.mark.parametrize("text, gone", [
    ("cannot read /data/hospital/site-a/scan.dcm now", ["/data", "scan.dcm", "site-a"]),
    (r"cannot read C:\data\site\x now", ["C:", "data\\site"]),
    ("cannot read ~/scans now", ["~/scans"]),
    (f"the file {SCAN} is broken", [PATIENT, ".nii.gz"]),
    (f"subject id {PATIENT!r} is already used", [PATIENT]),
    (f"damaged DICOM file (InvalidDicomError: {DICOM_NAME} at 1.2.840.113619.2.55)", [DICOM_NAME, "1.2.840"]),
    (f"patient {DICOM_NAME} has the series 1.2.840.113619.2.55.3", ["DOE", "113619"]),
    ("scan sub-017 of MRN 00123456 is short", ["sub-017", "00123456"]),
    ("header PatientName=DOE is set", ["DOE"]),
    ("series 1.2.3.4.5 is short", ["1.2.3"]),
])
def test_scrub_removes_paths_file_names_and_identifiers(text, gone):
    scrubbed = scrub(text)
    assert not [word for word in gone if word in scrubbed], scrubbed
    assert scrubbed.split()[0] == text.split()[0]  # the sentence around them stays


def test_scrub_keeps_plain_words_numbers_and_site_toml():
    text = "site.toml: modality MR with mr_percentiles 0.5 to 99.5 needs float32 T1w scans in 2D, e.g. 12 of them."
    assert scrub(text) == text


def test_scrub_keeps_the_sentence_ends_of_what_it_replaces():
    assert scrub("skipped /a/b.nii.gz. Fix it") == "skipped <path>. Fix it"


def test_a_long_detail_is_cut():
    scrubbed = scrub("word " * 200)
    assert len(scrubbed) <= MAX_DETAIL and scrubbed.endswith("…")


# -------------------------------------------------------------------------------------- categories and reasons
def test_a_real_site_error_leaves_only_its_scrubbed_reason(tmp_path):
    folder = broken_site(tmp_path / "site-x")
    with pytest.raises(SiteError) as raised:
        load_site(folder)
    assert str(folder / SCAN) in str(raised.value)  # what the site's log gets
    reason = reply_reason(raised.value)
    assert reason.startswith(f"site-data: {CATEGORIES['site-data']}. Detail: no usable scan")
    assert str(tmp_path) not in reason and PATIENT not in reason and "nii" not in reason


def test_a_bad_site_toml_value_is_not_sent(tmp_path):
    folder = broken_site(tmp_path / "site-y")
    (folder / "site.toml").write_text(f'modality = "{PATIENT}"\n')
    with pytest.raises(SiteError) as raised:
        load_site(folder)
    assert PATIENT in str(raised.value)
    reason = reply_reason(raised.value)
    assert PATIENT not in reason and "modality" in reason


def test_unreadable_round_settings_are_a_settings_error():
    with pytest.raises(ValueError) as raised:
        RoundJob.from_config({"model": "no-such-family"}, torch.device("cpu"))
    assert category_of(raised.value) == "settings"
    assert reply_reason(raised.value) == f"settings: {CATEGORIES['settings']}"  # a ValueError's text stays home


def test_a_state_folder_that_cannot_be_made_is_a_site_state_error(tmp_path):
    blocker = tmp_path / "state-is-a-file"
    blocker.write_text("")
    with pytest.raises(RuntimeError) as raised:
        site_state_dir({"state-dir": str(blocker / "sub")}, tmp_path)
    reason = reply_reason(raised.value)
    assert reason.startswith("site-state: ") and str(tmp_path) not in reason and "state-is-a-file" not in reason


@pytest.mark.parametrize("error, category", [
    (FloatingPointError("training loss became NaN/Inf at /data/x"), "training-diverged"),
    (MemoryError(), "out-of-memory"),
    (torch.OutOfMemoryError("CUDA out of memory"), "out-of-memory"),
    (ValueError(f"scan {PATIENT}: sr is not on the HR grid"), "internal"),
    (KeyError("config"), "internal"),
])
def test_other_errors_send_their_category_and_sentence_only(error, category):
    assert reply_reason(error) == f"{category}: {CATEGORIES[category]}"


def test_a_refusal_is_not_turned_into_an_error():
    assert SiteRefusal in PASS_THROUGH
