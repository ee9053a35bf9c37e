"""The run folder's record of what happened: ``metrics.jsonl``, ``summary.json`` and ``config.toml``.

Numbers only: per round and site, the scalar metrics the site chose to send.
"""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from pathlib import Path
from typing import Any, Mapping

import tomli_w
from flwr.common.config import flatten_dict, unflatten_dict

from shared_models.atomic import atomic_write


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename: never half-written."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def file_stem(name: str) -> str:
    """A site or model name as a file name in the run folder: anything but letters, digits, ``.``, ``_`` and ``-``
    becomes ``_`` (names come from hospitals' site.toml)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def write_run_config(run_dir: Path, flat: Mapping[str, Any]) -> Path:
    """``run_dir/config.toml``: the resolved run config, family options as tables (``[family]``) as in pyproject.

    The one writer of that file; :func:`read_run_config` reads it back flat, as Flower hands run configs over
    (Flower's own ``unflatten_dict`` / ``flatten_dict``, so both sides split keys the same way).
    """
    path = run_dir / "config.toml"
    atomic_write_text(path, tomli_w.dumps(unflatten_dict(dict(flat))))
    return path


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """What :func:`write_run_config` wrote, with nested tables flattened to ``table.key``."""
    return flatten_dict(tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8")))


class RunRecorder:
    """Appends one JSON object per (experiment, round, phase, site) to ``metrics.jsonl`` and keeps the latest
    evaluation of each experiment.

    ``experiment`` names the model being trained: ``global`` (the federation of every site), ``holdout:SITE`` (the
    federation without SITE), ``local:SITE`` or ``pooled`` (the baselines). ``phase`` is ``train`` or ``evaluate``;
    round 0 is the untrained model's evaluation.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.latest_evaluation: dict[str, dict[str, dict[str, float]]] = {}
        self.normalisation: dict[str, dict[str, Any]] = {}
        self.started = time.time()

    def record(
        self,
        server_round: int,
        phase: str,
        site: str,
        metrics: Mapping[str, Any],
        about: Mapping[str, Any],
        experiment: str = "global",
    ) -> None:
        """Append one line (flushed and fsynced, so a crash never leaves a partial object behind).

        ``about``: what the site said of itself besides its name: ``baseline`` (the interpolation its
        ``baseline-*`` scores come from), recorded in the row, and ``normalisation`` (JSON: modality, kind and range
        of its intensity mapping), kept for the checkpoints.
        """
        row = {"experiment": experiment, "round": server_round, "phase": phase, "site": site,
               "time": round(time.time() - self.started, 3)}
        if "baseline" in about:
            row["baseline"] = str(about["baseline"])
        if "normalisation" in about:
            self.normalisation[site] = json.loads(str(about["normalisation"]))
        row.update({k: v for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if phase == "evaluate":
            skip = ("experiment", "round", "phase", "site", "time")
            self.latest_evaluation.setdefault(experiment, {})[site] = {k: v for k, v in row.items() if k not in skip}

    def write_summary(self, rounds: int, experiment: str, extra: Mapping[str, Any] | None = None) -> Path:
        """``summary.json``: the last evaluation of every site of ``experiment`` (the run's main federated model)
        and the run's size/time."""
        summary = {
            "sites": self.latest_evaluation.get(experiment, {}),
            "model_name": experiment,
            "rounds": rounds,
            "wall_seconds": round(time.time() - self.started, 3),
        }
        summary.update(extra or {})
        path = self.run_dir / "summary.json"
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        return path
