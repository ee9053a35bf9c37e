"""The run folder's record of what happened: ``metrics.jsonl``, ``summary.json`` and ``config.toml``.

Numbers only: per round and site, the scalar metrics the site chose to send.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from shared_models.atomic import atomic_write


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename: never half-written."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def toml_dumps(values: Mapping[str, Any]) -> str:
    """A flat mapping of str/int/float/bool as TOML (the standard library reads TOML but cannot write it)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a valid TOML basic string
        else:
            raise TypeError(f"{key}: cannot write {type(value).__name__} to TOML")
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


class RunRecorder:
    """Appends one JSON object per (round, phase, site) to ``metrics.jsonl`` and keeps the latest evaluation.

    ``phase`` is ``train`` or ``evaluate``; round 0 is the untrained model's evaluation.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.latest_evaluation: dict[str, dict[str, float]] = {}
        self.started = time.time()

    def record(self, server_round: int, phase: str, site: str, metrics: Mapping[str, Any]) -> None:
        """Append one line (flushed and fsynced, so a crash never leaves a partial object behind)."""
        row = {"round": server_round, "phase": phase, "site": site, "time": round(time.time() - self.started, 3)}
        row.update({k: v for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if phase == "evaluate":
            self.latest_evaluation[site] = dict(metrics)

    def write_summary(self, rounds: int, extra: Mapping[str, Any] | None = None) -> Path:
        """``summary.json``: the last evaluation of every site (final global model) and the run's size/time."""
        summary = {
            "sites": self.latest_evaluation,
            "rounds": rounds,
            "wall_seconds": round(time.time() - self.started, 3),
        }
        summary.update(extra or {})
        path = self.run_dir / "summary.json"
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        return path
