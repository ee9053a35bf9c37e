"""A real federation on Flower's simulation engine, with sites that fail or misbehave.

Four phantom sites: two good ones (one also holding a corrupt DICOM and a text file), one empty folder, and
one whose training replies are corrupted on the way out by a Flower client mod (a wrong-shaped update).
The run must go on with the usable sites, name every problem, and still write its record.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.simulation import run_simulation

from client.app import build_client_app
from server.app import build_server_app
from server.settings import RunSettings
from shared_models.checkpoint import load_checkpoint
from simulation.phantoms import write_phantom_sites


def corrupt_site_three(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: node 3's train replies carry a conv weight of the wrong shape."""
    reply = call_next(msg, context)
    if context.node_config.get("partition-id") == 3 and msg.metadata.message_type == MessageType.TRAIN:
        weights = reply.content["arrays"].to_torch_state_dict()
        key = next(k for k, v in weights.items() if v.ndim == 4)
        weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1], 5, 5)
        reply.content["arrays"] = ArrayRecord(weights)
    return reply


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    sites = root / "sites"
    good = write_phantom_sites(sites, n_sites=3, subjects_per_site=3, shape=(48, 48, 16), seed=3)
    (good[0] / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 50)
    (good[0] / "notes.txt").write_text("not a scan")
    empty = sites / "site-0-empty"  # sorts first: partition 0
    empty.mkdir()
    folders = [str(empty)] + [str(p) for p in good]  # partitions 0..3; 3 is the corrupted one
    run_dir = root / "run"
    settings = RunSettings(
        num_rounds=2, num_sites=4, min_sites=2, local_steps=8, batch_size=4, patch_size=32,
        eval_max_slices=6, run_dir=str(run_dir), sites_dir=str(sites),
    )
    logger = logging.getLogger("server")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        run_simulation(
            server_app=build_server_app(settings),
            client_app=build_client_app(folders, mods=[corrupt_site_three]),
            num_supernodes=4,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
        )
    finally:
        logger.removeHandler(handler)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows, [r.getMessage() for r in records], [p.name for p in good]


def test_the_run_finishes_with_the_usable_sites(federation):
    run_dir, _rows, _log, names = federation
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["sites"]) == sorted(names)  # the empty site never evaluates
    model, meta = load_checkpoint(run_dir / "final_model.pt")
    assert meta["extra"]["round"] == 2 and meta["scale"] == 2
    # how each site mapped its scans to [0, 1] travels into the checkpoint (a rule, no scan's values)
    assert meta["normalisation"] == {
        name: {"modality": "MR", "kind": "mr-percentile", "range": [0.5, 99.5]} for name in names
    }


def test_an_empty_site_fails_alone_with_its_folder_named(federation):
    _run_dir, _rows, log, _names = federation
    failures = [m for m in log if "could not describe itself" in m and "site-data" in m]
    assert failures, log
    assert any("empty" in m for m in failures)
    assert not [m for m in log if "site-0-empty" in m]  # its folder's name stays at the site (the site's own log)


def test_a_wrong_shaped_update_is_rejected_and_named(federation):
    _run_dir, rows, log, names = federation
    corrupted = names[2]
    rejections = [m for m in log if "rejected" in m]
    assert len(rejections) == 2 and all(corrupted in m and "shape" in m for m in rejections)
    trained = {(r["round"], r["site"]) for r in rows if r["phase"] == "train" and r["experiment"] == "global"}
    assert trained == {(r, n) for r in (1, 2) for n in names[:2]}


def test_skipped_files_are_counted_and_the_site_still_trains(federation):
    _run_dir, rows, _log, names = federation
    first = [r for r in rows if r["site"] == names[0] and r["phase"] == "train"]
    assert first and all(r["skipped-files"] == 2 for r in first)


def test_round_zero_scores_the_untrained_model_as_bicubic(federation):
    _run_dir, rows, _log, names = federation
    evals = {(r["round"], r["site"]): r for r in rows if r["phase"] == "evaluate"}
    for name in names:
        zero = evals[(0, name)]
        assert zero["baseline"] == "bicubic"
        assert zero["psnr"] == pytest.approx(zero["baseline-psnr"], abs=1e-6)  # untrained model = bicubic
