"""Cross-site evaluation: every model of the run scored on every site's test split, once, after training.

One ``evaluate.cross`` message per site carries every model that may travel (``global``, ``holdout:SITE``, the
``local:SITE`` models whose sites share them, ``pooled``); a site that keeps its own local-only model scores it
too. Each site replies with per-scan numbers only (``scores:MODEL`` metric records of lists, one value per test
scan, the same scan order for every model, plus ``scores:interpolation``, its interpolation baseline) and, only
if its ``site.toml`` says ``share_previews = true``, small example crops. The results go to
``RUN_DIR/cross_site.json`` and ``RUN_DIR/previews/SITE.npz`` (the formats ``server.report`` documents), written
atomically.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from server.run_log import RunRecorder, atomic_write_text, file_stem
from server.settings import RunSettings
from server.sites import SiteGrid
from server.strategies import note_refusal, note_rejection
from server.updates import scores_rejection
from shared_models.atomic import atomic_write

log = logging.getLogger(__name__)

EVALUATE_CROSS = "evaluate.cross"
#: The ``experiment`` of the cross-site evaluation's rows in metrics.jsonl (a site's refusal).
CROSS_SITE = "cross-site"
MODEL_PREFIX = "model:"
SCORES_PREFIX = "scores:"
PREVIEWS = "previews"
#: A site's membership-inference check of the global model (client.membership.MEMBERSHIP).
MEMBERSHIP = "membership"
FORMAT = "fedsr-cross-site/1"


@dataclass
class CrossSiteResults:
    """What the cross-site evaluation gathered: ``scores[model][site][metric]`` = per-scan values, ``previews``
    {site: {name: 2D array}}, ``notes`` for the report, ``seconds`` the wall time of the whole evaluation,
    ``membership`` {site: the membership-inference check of the global model (``mia-*``, client.membership)}."""

    seconds: float = 0.0
    scores: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    previews: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    membership: dict[str, dict[str, float]] = field(default_factory=dict)


def cross_evaluate(
    grid: SiteGrid, settings: RunSettings, models: Mapping[str, ArrayRecord], score_own_local: bool,
    recorder: RunRecorder,
) -> CrossSiteResults:
    """Send every model in ``models`` to every site of ``grid`` and gather the per-scan scores.

    ``score_own_local``: sites that kept their local-only model score it too (as ``local:SITE``). A site that
    refuses, or whose scores are unusable (:func:`server.updates.scores_rejection`: keys, lengths, NaN/Inf), is
    recorded in ``recorder`` (experiment :data:`CROSS_SITE`) and noted; it has no column.
    """
    config = ConfigRecord(settings.round_config())
    config["server-round"] = settings.num_rounds
    config["score-own-local"] = score_own_local
    content = {"config": config, **{MODEL_PREFIX + name: arrays for name, arrays in models.items()}}
    messages = [
        grid.create_message(RecordDict(content), EVALUATE_CROSS, node, group_id="cross") for node in grid.sites
    ]
    start = time.perf_counter()
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
    results = CrossSiteResults(seconds=round(time.perf_counter() - start, 3))
    for reply in replies:
        site = grid.site_of(reply)  # an error reply does not name its site
        if reply.has_error():
            log.error("cross-site evaluation failed at site %s: %s", site, reply.error.reason)
            results.notes.append(f"{site}: the cross-site evaluation failed there; it has no column")
            continue
        if note_refusal(reply, recorder, settings.num_rounds, CROSS_SITE):
            results.notes.append(f"{site}: refused the cross-site evaluation (see the refusals); it has no column")
            continue
        rejection = scores_rejection(reply.content)
        if rejection:
            note_rejection(recorder, settings.num_rounds, EVALUATE_CROSS, site, rejection, CROSS_SITE)
            results.notes.append(f"{site}: its cross-site scores were rejected ({rejection.rule}); it has no column")
            continue
        for key, record in reply.content.metric_records.items():
            if key.startswith(SCORES_PREFIX):
                values = {metric: [float(v) for v in per_scan] for metric, per_scan in record.items()}
                results.scores.setdefault(key.removeprefix(SCORES_PREFIX), {})[site] = values
        if PREVIEWS in reply.content.array_records:
            previews = reply.content.array_records[PREVIEWS]
            results.previews[site] = {name: previews[name].numpy() for name in previews}
        if MEMBERSHIP in reply.content.metric_records:
            results.membership[site] = {k: float(v) for k, v in reply.content.metric_records[MEMBERSHIP].items()}
    return results


def write_cross_site(
    run_dir: Path,
    results: CrossSiteResults,
    sites: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
) -> Path:
    """``RUN_DIR/cross_site.json`` (``sites``: what each site said of itself; ``models``: kind and training sites
    of each model) and ``RUN_DIR/previews/SITE.npz``."""
    for site, crops in results.previews.items():
        folder = run_dir / PREVIEWS
        folder.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: np.asarray(crop, dtype=np.float32) for name, crop in crops.items()})
        atomic_write(folder / f"{file_stem(site)}.npz", lambda handle: handle.write(buffer.getvalue()))
    document = {"format": FORMAT, "sites": sites, "models": models, "scores": results.scores, "notes": results.notes,
                "seconds": results.seconds, "membership": results.membership}
    path = run_dir / "cross_site.json"
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    return path
