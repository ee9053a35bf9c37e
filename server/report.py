"""The cross-site report's data: ``RUN_DIR/report.json``, built from what a run folder stores.

Inputs (RUN_DIR): ``config.toml`` (required: it makes a folder a run folder), ``metrics.jsonl`` (per round and
site), ``cross_site.json`` (``fedsr-cross-site/1``: per-scan test scores of every model at every site where it was
scored; missing when a run stopped before cross-site evaluation: the report then holds the rounds only, and a note
says so) and ``previews/<SITE>.npz``. Numbers only: no image is read (a preview's array names are listed, not its
arrays).

report.json (``"schema": "fedsr-report/1"``), keys in this order:

- ``created``: ISO 8601 UTC time the report was built.
- ``config``: the flat run config (``config.toml``, family options as ``family.option``).
- ``metrics``: ``{METRIC: {"label", "unit", "higher_is_better"}}`` for every METRIC below (:data:`METRICS`).
- ``sites``: cross_site.json's ``sites``, each with ``test_note`` (why the site has no test scores, else null).
- ``models``: cross_site.json's ``models`` (``kind``, ``trained_on``, ...).
- ``cross_site``: ``{METRIC: {MODEL: {SITE: cell}}}``: only where MODEL was scored at SITE. METRIC: ``psnr`` (dB,
  higher better), ``ssim`` (higher better), ``nrmse`` (lower), ``hfen`` (lower), ``dc-error`` (RMS of re-acquired SR
  minus LR, normalised intensity; the site's noise level is ideal), ``hf-excess`` (SR high-frequency energy absent
  from HR, fraction of HR's; lower), ``psnr-gain`` (dB) and ``ssim-gain``: MODEL minus the site's interpolation
  baseline, scan by scan (paired), for every MODEL but ``interpolation``.
- ``pooled_test``: ``{METRIC: {MODEL: cell}}`` over the concatenated test scans of every site that has test
  scores, for the models scored at all of them.
- ``leave_one_out``: ``{SITE: {"held_out": {METRIC: cell}, "in_federation": {METRIC: cell}, "local_elsewhere":
  {MODEL: {METRIC: cell}}}}`` for every ``holdout`` model: held_out = the model that never saw SITE, scored at SITE;
  in_federation = ``global`` at SITE (each {} where that model was not scored there); local_elsewhere = every
  other site's local model that was scored at SITE.
- ``rounds`` / ``training``: metrics.jsonl's ``evaluate`` / ``train`` rows in file order, without ``phase``, each
  with ``experiment`` (the model the row's training belongs to: ``global`` when the row has none, ``holdout:SITE``, ``local:SITE``, ``pooled``).
- ``refusals``: metrics.jsonl's ``refused`` rows in file order, each ``{"experiment", "round", "site", "request",
  "category", "reason"}``: a site declined ``request`` (a message type: ``train``, ``evaluate``, ``train.local``,
  ``train.pooled``, ``evaluate.cross``) of that round, for the reason it gave (e.g. its site.toml ``[policy]``).
- ``rejections``: metrics.jsonl's ``rejected`` rows in file order, each ``{"experiment", "round", "site", "request",
  "rule", "reason"}``: the coordinator did not use the site's reply to ``request`` (``train``, ``evaluate``,
  ``evaluate.cross``) because it broke ``rule`` (server.updates: ``records``, ``keys``, ``shape``, ``dtype``,
  ``non-finite``, ``num-examples``, ``metric-keys``, ``norm``), or, site ``*`` and rule ``aggregate``, the round's
  aggregate was non-finite and not adopted.
- ``privacy``: ``{"dp": "none" | "local", "unit", "target_epsilon", "warning": str | null, "sites": {SITE:
  {"epsilon", "delta", "noise_multiplier", "sample_rate", "units", "clip_norm", "clipped_fraction", "round"}}}``:
  (and ``"central"``: summary.json's ``central_dp``, ``{"unit": "site", "epsilon", "delta", "noise_multiplier",
  "clipping", "clip_norm", "rounds"}``, for ``dp = "central"``, else null): the run's DP settings, and per site (local
  DP) the privacy spent as of its last DP train row of the federated model
  (``epsilon``: the site ledger's total per unit at ``delta``, across runs; ``round``: that row's round).
  ``warning``: set for patch-level DP (the guarantee covers an image tile, not a patient). ``membership``: cross_site.json's
  ``membership``, ``{SITE: {"mia-auc", "mia-advantage", "mia-members", "mia-non-members"}}``: the loss-threshold
  membership-inference attack on the global model at each site (client.membership), for every run, DP or not.
- ``model_options``: summary.json's ``personal`` (personal = "head": the modules and weights each site keeps,
  their parameter count, and how a site without its own head is served: shared_models.personal) and
  ``conditioning`` (condition = "acquisition": the FiLM, its feature maps and the acquisition fields with units:
  shared_models.conditioning), each null when the run did not use it.
- ``previews``: ``{SITE: {"file": "previews/SITE.npz", "models": [MODEL, ...]}}`` (the ``sr:MODEL`` arrays it holds).
- ``notes``: cross_site.json's notes, then the report's own (no cross-site evaluation, sites without test scores,
  sites with fewer than 3 test scans).

A cell is ``{"mean": float, "ci95": [lo, hi] | null, "n_scans": int, "note": str | null}``: the mean over test
scans and the 95 % percentile bootstrap interval of that mean, resampling scans (``scipy.stats.bootstrap``, 10000
resamples, seed 0: the same run gives the same report). All scans equal: ``[v, v]``. Fewer than 3 scans: null, with
the note ``"fewer than 3 test scans (n=N): no interval"``.
"""

from __future__ import annotations

import json
import math
import tomllib
import zipfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import bootstrap

from server.run_log import (
    REFUSAL_KEYS, REFUSED, REJECTED, REJECTION_KEYS, atomic_write_text, file_stem, read_run_config,
)
from shared_models.errors import ExplainedError
from shared_models.settings import PATCH_UNIT_WARNING

SCHEMA = "fedsr-report/1"
CROSS_SITE_FORMAT = "fedsr-cross-site/1"
#: Every metric of the report: its label, unit and direction.
METRICS: dict[str, dict[str, Any]] = {
    "psnr": {"label": "PSNR", "unit": "dB", "higher_is_better": True},
    "ssim": {"label": "SSIM", "unit": "", "higher_is_better": True},
    "nrmse": {"label": "NRMSE", "unit": "", "higher_is_better": False},
    "hfen": {"label": "HFEN", "unit": "", "higher_is_better": False},
    "dc-error": {"label": "Data-consistency error", "unit": "normalised intensity", "higher_is_better": False},
    "hf-excess": {"label": "Invented high frequencies", "unit": "fraction of HR high-frequency energy",
                  "higher_is_better": False},
    "psnr-gain": {"label": "PSNR gain over interpolation", "unit": "dB", "higher_is_better": True},
    "ssim-gain": {"label": "SSIM gain over interpolation", "unit": "", "higher_is_better": True},
}
#: The gain metrics and the scored metric each is the paired difference of.
GAINS = {"psnr-gain": "psnr", "ssim-gain": "ssim"}
INTERPOLATION = "interpolation"
#: A site's DP numbers in report.json's ``privacy`` (each the train row's ``dp-`` key, ``_`` as ``-``).
PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "units", "clip_norm", "clipped_fraction")
MIN_SCANS_FOR_CI = 3
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

Scores = dict[str, dict[str, dict[str, list[float]]]]  # MODEL -> SITE -> METRIC -> per-scan values


class ReportInputError(ExplainedError, ValueError):
    """A run folder, or one of its files, that a report cannot be built from."""


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Build the report of ``run_dir`` and write ``report.json`` (atomically, indent 2) and ``report.html``.

    Returns (report.json, report.html). Raises :class:`ReportInputError` as :func:`build_report` does.
    """
    report = build_report(run_dir)
    json_path = run_dir / "report.json"
    atomic_write_text(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    from server.report_html import write_report_html  # here: report.json is written even if the page cannot be

    return json_path, write_report_html(report, run_dir)


def build_report(run_dir: Path) -> dict[str, Any]:
    """The report.json dict of ``run_dir`` (schema in this module's docstring).

    Raises:
        ReportInputError: ``run_dir`` is not a run folder (no ``config.toml``), or a file in it cannot be read;
            the message names the file and what to do.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportInputError(run_dir, "no such folder", "Give the run folder (--run-dir of the run)")
    if not (run_dir / "config.toml").is_file():
        raise ReportInputError(run_dir, "not a run folder (it has no config.toml)",
                               "Give the folder that fedsr simulate or the ServerApp wrote (--run-dir)")
    try:
        config = read_run_config(run_dir)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ReportInputError(run_dir / "config.toml", f"not readable TOML ({error})",
                               "Restore the file the run wrote; it is written once, at the start") from None
    rows = read_metrics(run_dir / "metrics.jsonl")
    stored = read_cross_site(run_dir / "cross_site.json")
    notes: list[str] = []
    if not (run_dir / "metrics.jsonl").exists():
        notes.append("no metrics.jsonl: the run stopped before its first round was recorded")
    if stored is None:
        notes.append("cross-site evaluation did not run (no cross_site.json; the run may have stopped early): "
                     "only the per-round validation scores are shown")
        stored = {"sites": {}, "models": {}, "scores": {}, "notes": []}
    sites = {name: {**entry, "test_note": entry.get("test_note")} for name, entry in stored["sites"].items()}
    scores: Scores = stored["scores"]
    notes = [*stored["notes"], *notes, *_site_notes(sites, scores)]
    summary = read_summary(run_dir / "summary.json")
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "metrics": METRICS,
        "sites": sites,
        "models": stored["models"],
        "cross_site": cross_site_cells(scores, list(sites)),
        "pooled_test": pooled_cells(scores, list(sites)),
        "leave_one_out": leave_one_out(stored["models"], scores),
        "rounds": [_row(r) for r in rows if r.get("phase") == "evaluate"],
        "training": [_row(r) for r in rows if r.get("phase") == "train"],
        "refusals": [_refusal(r) for r in rows if r.get("phase") == REFUSED],
        "rejections": [_rejection(r) for r in rows if r.get("phase") == REJECTED],
        "privacy": {**privacy_summary(config, rows, summary.get("central_dp")),
                    "membership": stored.get("membership", {})},
        "model_options": {"personal": summary.get("personal"), "conditioning": summary.get("conditioning")},
        "previews": list_previews(run_dir / "previews", list(sites)),
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------------------- cells
def cell(values: Sequence[float]) -> dict[str, Any]:
    """Mean of per-scan ``values`` (at least one) with its 95 % percentile bootstrap interval (see module doc)."""
    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    if data.size < MIN_SCANS_FOR_CI:
        return {"mean": mean, "ci95": None, "n_scans": int(data.size),
                "note": f"fewer than {MIN_SCANS_FOR_CI} test scans (n={data.size}): no interval"}
    if np.all(data == data[0]):  # the bootstrap distribution is a point (scipy warns and returns nan)
        interval = [mean, mean]
    else:
        result = bootstrap((data,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                           confidence_level=0.95, batch=1000, random_state=np.random.default_rng(BOOTSTRAP_SEED))
        interval = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
    return {"mean": mean, "ci95": interval, "n_scans": int(data.size), "note": None}


def per_scan(scores: Scores, model: str, site: str) -> dict[str, list[float]]:
    """Every metric's per-scan values of ``model`` at ``site``, gains included ({} where it was not scored).

    A gain is the model's value minus the site's interpolation value on the same scan (lists are stored in the
    same scan order for every model at a site).
    """
    stored = scores.get(model, {}).get(site)
    if not stored:
        return {}
    values = {metric: list(stored[metric]) for metric in METRICS if metric in stored}
    baseline = scores.get(INTERPOLATION, {}).get(site, {})
    if model != INTERPOLATION:
        for gain, metric in GAINS.items():
            if metric in stored and metric in baseline:
                values[gain] = [m - b for m, b in zip(stored[metric], baseline[metric], strict=True)]
    return {metric: v for metric, v in values.items() if v}


def cross_site_cells(scores: Scores, sites: list[str]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{METRIC: {MODEL: {SITE: cell}}}`` of every model at every site where it was scored."""
    matrix: dict[str, dict[str, dict[str, dict[str, Any]]]] = {metric: {} for metric in METRICS}
    for model in scores:
        for site in sites:
            for metric, values in per_scan(scores, model, site).items():
                matrix[metric].setdefault(model, {})[site] = cell(values)
    return matrix


def pooled_cells(scores: Scores, sites: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{METRIC: {MODEL: cell}}`` over the concatenated scans of the sites with test scores, for the models
    scored at every one of them."""
    tested = [site for site in sites if any(site in by_site for by_site in scores.values())]
    pooled: dict[str, dict[str, dict[str, Any]]] = {metric: {} for metric in METRICS}
    for model in scores:
        at_sites = [per_scan(scores, model, site) for site in tested]
        if not tested or not all(at_sites):
            continue
        for metric in METRICS:
            if all(metric in values for values in at_sites):
                pooled[metric][model] = cell([v for values in at_sites for v in values[metric]])
    return pooled


def leave_one_out(models: Mapping[str, Mapping[str, Any]], scores: Scores) -> dict[str, dict[str, Any]]:
    """Per held-out site: the model that never saw it, the global model and the other sites' local models, there."""
    comparison: dict[str, dict[str, Any]] = {}
    for name, about in models.items():
        if about.get("kind") != "holdout":
            continue
        site = about["held_out"]
        comparison[site] = {
            "held_out": _site_cells(scores, name, site),
            "in_federation": _site_cells(scores, "global", site),
            "local_elsewhere": {
                other: _site_cells(scores, other, site) for other, kind in models.items()
                if kind.get("kind") == "local" and list(kind.get("trained_on", [])) != [site]
                and site in scores.get(other, {})
            },
        }
    return comparison


def _site_cells(scores: Scores, model: str, site: str) -> dict[str, dict[str, Any]]:
    return {metric: cell(values) for metric, values in per_scan(scores, model, site).items()}


def _site_notes(sites: Mapping[str, Mapping[str, Any]], scores: Scores) -> list[str]:
    """A line per site without test scores (with its reason) and per site with too few scans for intervals."""
    notes = []
    for site, entry in sites.items():
        lengths = {len(v) for by_site in scores.values() for v in by_site.get(site, {}).values()}
        if not lengths:
            notes.append(f"{site}: no test scores ({entry.get('test_note') or 'no test scans'})")
        elif max(lengths) < MIN_SCANS_FOR_CI:
            notes.append(f"{site}: {max(lengths)} test scans, fewer than {MIN_SCANS_FOR_CI}: means only, no intervals")
    return notes


# -------------------------------------------------------------------------------------------------------- inputs
def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row for the report: ``experiment`` first (``global`` by default), ``phase`` dropped."""
    return {"experiment": row.get("experiment", "global"),
            **{k: v for k, v in row.items() if k not in ("phase", "experiment")}}


def read_summary(path: Path) -> dict[str, Any]:
    """summary.json's dict ({} when the run has none yet: it is written when the federated training ends)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ReportInputError(path, f"not readable JSON ({error})",
                               "Restore the file the run wrote, or delete it to build the report without it") from None


def privacy_summary(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                    central: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """report.json's ``privacy`` (see the module docstring) from the run config, metrics.jsonl's rows and, for
    central DP, summary.json's ``central_dp``."""
    sites: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("phase") == "train" and row.get("experiment", "global") == "global" and "dp-epsilon" in row:
            sites[row["site"]] = {key: row[f"dp-{key.replace('_', '-')}"] for key in PRIVACY_KEYS} | {
                "round": row["round"]}
    unit = config.get("dp-unit", "patient")
    if config.get("dp") == "central":
        unit = "site"
    return {"dp": config.get("dp", "none"), "unit": unit, "target_epsilon": config.get("dp-target-epsilon"),
            "warning": PATCH_UNIT_WARNING if config.get("dp") == "local" and unit == "patch" else None,
            "sites": sites, "central": dict(central) if central else None}


def _refusal(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl refusal row for the report (a missing key: an empty string)."""
    return _event(row, REFUSAL_KEYS)


def _rejection(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl rejection row for the report (a missing key: an empty string)."""
    return _event(row, REJECTION_KEYS)


def _event(row: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """A row's experiment (``global`` when it has none), round, site and its own ``keys`` as text."""
    return {"experiment": row.get("experiment", "global"), "round": row["round"], "site": row["site"],
            **{key: str(row.get(key, "")) for key in keys}}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows ([] when the file does not exist).

    Raises:
        ReportInputError: a line that is not a JSON object with ``round``, ``phase`` and ``site`` (names the line).
    """
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not {"round", "phase", "site"} <= row.keys():
            raise ReportInputError(path, f"line {number} is not a metrics row (a JSON object with round, phase and "
                                         "site); the run may have stopped while writing it",
                                   f"Delete line {number} and run fedsr report again")
        rows.append(row)
    return rows


def read_cross_site(path: Path) -> dict[str, Any] | None:
    """cross_site.json, checked (None when the file does not exist).

    Raises:
        ReportInputError: not JSON, another format, or scores that do not fit together (names the part).
    """
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportInputError(path, f"not readable JSON ({error}); it may be half-written",
                               "Delete it to build the report from metrics.jsonl alone") from None
    problem = _cross_site_problem(stored)
    if problem:
        raise ReportInputError(path, problem, f"It must be a {CROSS_SITE_FORMAT} file as the ServerApp writes it; "
                                              "delete it to build the report from metrics.jsonl alone")
    return stored


def _cross_site_problem(stored: Any) -> str | None:
    """What is wrong with a loaded cross_site.json, or None (formats: docs/report_schema, this module's doc)."""
    if not isinstance(stored, dict) or stored.get("format") != CROSS_SITE_FORMAT:
        return f"its format is not {CROSS_SITE_FORMAT}"
    for key, kind in (("sites", dict), ("models", dict), ("scores", dict), ("notes", list)):
        if not isinstance(stored.get(key), kind):
            return f"{key!r} is missing or not a {'list' if kind is list else 'JSON object'}"
    if not all(isinstance(note, str) for note in stored["notes"]):
        return "'notes' holds something that is not text"
    if not all(isinstance(entry, dict) for entry in stored["sites"].values()):
        return "'sites' holds an entry that is not a JSON object"
    for model, about in stored["models"].items():
        held_out_unknown = isinstance(about, dict) and about.get("kind") == "holdout" and (
            about.get("held_out") not in stored["sites"])
        if not isinstance(about, dict) or held_out_unknown:
            return f"models[{model!r}] is not a model entry (a holdout model names its held_out site)"
    lengths: dict[str, int] = {}
    for model, by_site in stored["scores"].items():
        if model not in stored["models"] or not isinstance(by_site, dict):
            return f"scores[{model!r}]: not a model listed under 'models'"
        for site, by_metric in by_site.items():
            where = f"scores[{model!r}][{site!r}]"
            if site not in stored["sites"] or not isinstance(by_metric, dict):
                return f"{where}: not a site listed under 'sites'"
            for metric, values in by_metric.items():
                if not isinstance(values, list) or not all(_finite(v) for v in values):
                    return f"{where}[{metric!r}] is not a list of finite numbers"
                if lengths.setdefault(site, len(values)) != len(values):
                    return (f"{where}[{metric!r}] has {len(values)} scans where the site's other lists have "
                            f"{lengths[site]}: per-scan lists at one site must pair up")
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def list_previews(folder: Path, sites: list[str]) -> dict[str, dict[str, Any]]:
    """``{SITE: {"file": "previews/SITE.npz", "models": [...]}}`` of the preview files present, in site order
    (files of sites not in ``sites`` after them). Only the array names are read (a zip's directory), no image.

    Raises:
        ReportInputError: a preview that is not a readable .npz (names it).
    """
    stems = {file_stem(site): site for site in sites}
    files = {stems.get(path.stem, path.stem): path for path in sorted(folder.glob("*.npz"))} if folder.is_dir() else {}
    order = [site for site in sites if site in files] + [site for site in files if site not in sites]
    previews = {}
    for site in order:
        try:
            with zipfile.ZipFile(files[site]) as archive:
                names = [name.removesuffix(".npy") for name in archive.namelist()]
        except (zipfile.BadZipFile, OSError) as error:
            raise ReportInputError(files[site], f"not a readable .npz ({error})",
                                   "Delete it: the report then shows that site without a preview") from None
        previews[site] = {"file": f"{folder.name}/{files[site].name}",
                          "models": [name.removeprefix("sr:") for name in names if name.startswith("sr:")]}
    return previews
