"""The run folder's record of what happened: ``metrics.jsonl``, ``summary.json`` and ``config.toml``.

Numbers only: per round and site, the scalar metrics the site chose to send. A resumed run (``resume``) keeps the
record of the rounds that completed and drops the rest, so that no round is recorded twice.
"""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w
from flwr.common.config import flatten_dict, unflatten_dict

from shared_models.atomic import atomic_write
from shared_models.errors import ExplainedError

#: The run-config keys a resumed run may set differently from its ``config.toml``: the switch itself, and the
#: folder (a run folder may have been moved).
RESUME_FREE = ("resume", "run-dir")
#: Keys of a ``metrics.jsonl`` row that are not the site's metrics.
ROW_KEYS = ("experiment", "round", "phase", "site", "time")
#: ``phase`` of a row that records a site's refusal; its other keys are :data:`REFUSAL_KEYS`.
REFUSED = "refused"
#: A refusal row's own keys: the message type refused (``train``, ``evaluate``, ``train.local``, ...), and the
#: category and reason the site gave.
REFUSAL_KEYS = ("request", "category", "reason")
#: ``phase`` of a row that records a reply the coordinator rejected (server.updates); its keys: :data:`REJECTION_KEYS`.
REJECTED = "rejected"
#: A rejection row's own keys: the message type of the reply (``train``, ``evaluate``, ``evaluate.cross``), the rule
#: it broke (server.updates.RULES) and the problem.
REJECTION_KEYS = ("request", "rule", "reason")


class ResumeError(ExplainedError, ValueError):
    """A run folder that cannot be resumed as asked; the message names the file and what to do."""


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


def read_resumed_config(run_dir: Path) -> dict[str, Any]:
    """The run config of the run to resume in ``run_dir``; a ResumeError naming the file when it has none."""
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ResumeError(path, "not there, so this is no run folder (or its run never started)",
                          "give the folder of a run that completed at least one round, or start a new run")
    return read_run_config(run_dir)


def check_resumed_config(run_dir: Path, flat: Mapping[str, Any]) -> None:
    """Raise a ResumeError naming ``run_dir/config.toml`` and every key whose value there differs from ``flat``
    (the resumed run's config), apart from :data:`RESUME_FREE`: a run continues with the settings it began with."""
    stored = read_resumed_config(run_dir)
    keys = sorted((set(stored) | set(flat)) - set(RESUME_FREE))
    changed = [f"{key} = {stored.get(key, '(absent)')!r} there, {flat.get(key, '(absent)')!r} now"
               for key in keys if stored.get(key) != flat.get(key)]
    if changed:
        raise ResumeError(run_dir / "config.toml", f"the run began with other settings: {'; '.join(changed)}",
                          "resume with that file's settings (fedsr simulate --resume RUN_DIR reads them from it; "
                          "with flwr run, give the run's own --run-config plus resume=true and its run-dir)")


def keep_completed_rows(path: Path, completed: Mapping[str, int]) -> tuple[list[dict], int]:
    """Resume: keep in ``metrics.jsonl`` (``path``) only the rows of completed rounds, those of each experiment
    ``E`` up to round ``completed[E]``; rows of other experiments (a baseline, a federation that had not
    finished a round) and a cut last line are dropped. The file is rewritten (atomically) only when something is
    dropped, so a second call changes nothing. Returns (the rows kept, how many lines were dropped)."""
    if not path.exists():
        return [], 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by the stop
        if row.get("round", -1) <= completed.get(row.get("experiment"), -1):
            kept.append(row)
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    return kept, len(lines) - len(kept)


class RunRecorder:
    """Appends one JSON object per (experiment, round, phase, site) to ``metrics.jsonl`` and keeps the latest
    evaluation of each experiment.

    ``experiment`` names the model being trained: ``global`` (the federation of every site), ``holdout:SITE`` (the
    federation without SITE), ``local:SITE`` or ``pooled`` (the baselines), ``cross-site`` (the cross-site
    evaluation). ``phase`` is ``train`` or ``evaluate``, :data:`REFUSED` for a site's refusal of a request
    (:meth:`record_refusal`), or :data:`REJECTED` for a reply the coordinator did not use (:meth:`record_rejection`);
    round 0 is the untrained model's evaluation.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.latest_evaluation: dict[str, dict[str, dict[str, float]]] = {}
        self.evaluated_round: dict[str, dict[str, int]] = {}  # each experiment's last evaluated round per site
        self.normalisation: dict[str, dict[str, Any]] = {}
        self.refusals: list[dict[str, Any]] = []  # the refusal rows, in order
        self.rejections: list[dict[str, Any]] = []  # the rejection rows, in order
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
        self._append(row)

    def record_refusal(
        self, server_round: int, request: str, site: str, category: str, reason: str, experiment: str = "global"
    ) -> None:
        """Append the row of a site's refusal of ``request`` (a message type) in ``server_round`` of ``experiment``,
        with the ``category`` and ``reason`` the site gave (phase :data:`REFUSED`)."""
        self._append({"experiment": experiment, "round": server_round, "phase": REFUSED, "site": site,
                      "time": round(time.time() - self.started, 3), "request": request, "category": category,
                      "reason": reason})

    def record_rejection(
        self, server_round: int, request: str, site: str, rule: str, reason: str, experiment: str = "global"
    ) -> None:
        """Append the row of a reply to ``request`` (``train``, ``evaluate``, ``evaluate.cross``) that the coordinator
        rejected in ``server_round`` of ``experiment``: the ``rule`` it broke and the ``reason`` (phase
        :data:`REJECTED`). A non-finite aggregate is rule ``aggregate`` of site ``*``."""
        self._append({"experiment": experiment, "round": server_round, "phase": REJECTED, "site": site,
                      "time": round(time.time() - self.started, 3), "request": request, "rule": rule,
                      "reason": reason})

    def _append(self, row: dict[str, Any]) -> None:
        """Append ``row`` as one line (flushed and fsynced) and remember what later rows and the summary need."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._remember(row)

    def _remember(self, row: Mapping[str, Any]) -> None:
        """Keep an evaluation row as its experiment's latest at its site, and every refusal and rejection row."""
        if row["phase"] == REFUSED:
            self.refusals.append(dict(row))
        if row["phase"] == REJECTED:
            self.rejections.append(dict(row))
        if row["phase"] == "evaluate":
            latest = {k: v for k, v in row.items() if k not in ROW_KEYS}
            self.latest_evaluation.setdefault(row["experiment"], {})[row["site"]] = latest
            self.evaluated_round.setdefault(row["experiment"], {})[row["site"]] = int(row["round"])

    def resume(self, completed: Mapping[str, int]) -> int:
        """Continue a stopped run's record: drop the rows of rounds that did not complete (``completed``: each
        experiment's last completed round; see :func:`keep_completed_rows`), take the latest evaluations from the
        rows kept, and go on counting ``time`` from the last of them. Returns how many rows were dropped."""
        kept, dropped = keep_completed_rows(self.path, completed)
        for row in kept:
            self._remember(row)
        self.started = time.time() - max((row.get("time", 0.0) for row in kept), default=0.0)
        return dropped

    def write_summary(
        self, rounds: int, experiment: str, extra: Mapping[str, Any] | None = None, members: Sequence[str] = ()
    ) -> Path:
        """``summary.json``: the last evaluation of every site of ``experiment`` (the run's main federated model),
        ``missing_sites``: those of its ``members`` that did not evaluate the last round (``{site: last round they
        evaluated, or null}``: gone during the run, or never there), ``refusals``: every refusal recorded so far
        (``{experiment, round, site, request, category, reason}``), ``rejections``: every rejected reply so far
        (``{experiment, round, site, request, rule, reason}``), ``rejected``: their count per site (``*``: a
        rejected aggregate), and the run's size/time."""
        evaluated = self.evaluated_round.get(experiment, {})
        summary = {
            "sites": self.latest_evaluation.get(experiment, {}),
            "missing_sites": {site: evaluated.get(site) for site in sorted(members) if evaluated.get(site) != rounds},
            "refusals": [{k: v for k, v in row.items() if k not in ("phase", "time")} for row in self.refusals],
            "rejections": [{k: v for k, v in row.items() if k not in ("phase", "time")} for row in self.rejections],
            "rejected": dict(sorted(Counter(row["site"] for row in self.rejections).items())),
            "model_name": experiment,
            "rounds": rounds,
            "wall_seconds": round(time.time() - self.started, 3),
        }
        summary.update(extra or {})
        path = self.run_dir / "summary.json"
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        return path
