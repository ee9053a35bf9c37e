"""A synthetic but complete run folder, in the formats the ServerApp writes (config.toml, metrics.jsonl,
cross_site.json, previews/<SITE>.npz), for the report's tests and for looking at a report without training.

Values are random (a seeded ``numpy.random.Generator``) but shaped like a real run: interpolation PSNR 27-31 dB per
scan, the global and pooled models about 3 dB above it, a local model about as good at its own site and worse
elsewhere, a holdout model between the two; SSIM, NRMSE and HFEN follow the same scan-by-scan ranking.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from server.run_log import atomic_write_text, write_run_config
from server.settings import RunSettings
from shared_models.atomic import atomic_write

#: (scanner, acquisition preset, LR noise level, baseline) of the sample sites, cycled when more are asked for.
SCANNERS = (
    ("Siemens Prisma 3T", "mr-3t-kspace", 0.010, "bicubic"),
    ("GE Signa 1.5T", "mr-1.5t-kspace", 0.020, "bicubic"),
    ("Philips Ingenia 3T", "mr-3t-kspace", 0.015, "bicubic"),
)
ROUNDS = 3
#: Preview crop side (LR pixels); the HR crop is ``scale`` times larger.
PREVIEW_SIDE = 24


def sample_site_names(n_sites: int) -> list[str]:
    """``site-<i>-<scanner slug>`` as phantom sites are named, e.g. ``site-1-siemens-prisma-3t``."""
    return [f"site-{i + 1}-{SCANNERS[i % len(SCANNERS)][0].lower().replace(' ', '-')}" for i in range(n_sites)]


def write_sample_run(
    run_dir: Path,
    *,
    n_sites: int = 3,
    scans_per_site: int = 4,
    holdout: bool = True,
    previews: bool = True,
    seed: int = 0,
    unshared_site: int | None = None,
    short_site: int | None = None,
) -> Path:
    """Write a finished run's folder to ``run_dir`` (created) and return it.

    Args:
        n_sites: sites in the federation.
        scans_per_site: test scans per site (every model's per-scan lists at a site have this length).
        holdout: also write leave-one-out models ``holdout:S`` and their ``holdout:S`` experiments' metrics rows.
        previews: write ``previews/<SITE>.npz`` for every site (and mark them ``shares_previews``).
        seed: seed of every random value.
        unshared_site: index (0-based) of a site whose local model stays there: scored at that site only, and
            cross_site.json's notes say so.
        short_site: index (0-based) of a site with 2 test scans only.
    """
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = RunSettings(num_sites=n_sites, num_rounds=ROUNDS, run_dir=str(run_dir.resolve()), seed=seed)
    write_run_config(run_dir, settings.to_config())
    names = sample_site_names(n_sites)
    test_scans = {name: 2 if i == short_site else scans_per_site for i, name in enumerate(names)}
    unshared = names[unshared_site] if unshared_site is not None else None

    sites = {name: _site_entry(i, test_scans[name], name != unshared, previews) for i, name in enumerate(names)}
    models: dict[str, dict] = {"global": {"kind": "federated", "trained_on": names}}
    models.update({f"local:{s}": {"kind": "local", "trained_on": [s], "shared": s != unshared} for s in names})
    models["pooled"] = {"kind": "pooled", "trained_on": names}
    if holdout:
        models.update({f"holdout:{s}": {"kind": "holdout", "trained_on": [t for t in names if t != s],
                                        "held_out": s} for s in names})
    models["interpolation"] = {"kind": "interpolation", "trained_on": []}

    scores: dict[str, dict[str, dict[str, list[float]]]] = {model: {} for model in models}
    for i, site in enumerate(names):
        difficulty = rng.uniform(27.0, 31.0, test_scans[site])  # interpolation PSNR of each scan (dB)
        for model in models:
            gain = _psnr_gain(model, site)
            if gain is None or (model == f"local:{unshared}" and site != unshared):
                continue
            psnr = difficulty + gain + rng.normal(0.0, 0.3, difficulty.size)
            scores[model][site] = _metrics(psnr, gain, SCANNERS[i % len(SCANNERS)][2], model, rng)
    notes = [f"local:{unshared} stays at {unshared} (its site.toml keeps it): scored there only"] if unshared else []
    cross_site = {"format": "fedsr-cross-site/1", "sites": sites, "models": models, "scores": scores, "notes": notes}
    atomic_write_text(run_dir / "cross_site.json", json.dumps(cross_site, indent=2) + "\n")
    _write_metrics(run_dir, names, holdout, rng)
    if previews:
        for site in names:
            _write_preview(run_dir / "previews" / f"{site}.npz", [m for m in models if site in scores[m]],
                           settings.scale, rng)
    return run_dir


def _site_entry(index: int, n_test: int, shares_local: bool, shares_previews: bool) -> dict:
    scanner, acquisition, noise, baseline = SCANNERS[index % len(SCANNERS)]
    counts = {"train": 5, "val": 2, "test": n_test}
    return {
        "modality": "MR", "scanner": scanner, "acquisition": acquisition, "noise_level": noise,
        "supervision": "paired", "baseline": baseline, "scans": counts, "patients": dict(counts),
        "shares_local_model": shares_local, "shares_previews": shares_previews, "in_federation": True,
    }


def _psnr_gain(model: str, site: str) -> float | None:
    """Typical PSNR above interpolation (dB) of ``model`` at ``site``; None: not scored there."""
    kind, _, about = model.partition(":")
    if kind == "local":
        return 3.2 if about == site else 1.0
    if kind == "holdout":
        return 2.0 if about == site else 3.0
    return {"global": 3.0, "pooled": 3.4, "interpolation": 0.0}[kind]


def _metrics(psnr: np.ndarray, gain: float, noise: float, model: str, rng: np.random.Generator) -> dict:
    """Every metric's per-scan list from the per-scan PSNR (dB), consistent with it."""
    n = psnr.size
    interpolation = model == "interpolation"
    return {
        "psnr": psnr.round(3).tolist(),
        "ssim": np.clip(0.80 + 0.012 * (psnr - 27.0) + rng.normal(0, 0.005, n), 0, 1).round(4).tolist(),
        "nrmse": (10 ** (-psnr / 20) * 4.0 * rng.uniform(0.95, 1.05, n)).round(5).tolist(),
        "hfen": (0.35 - 0.03 * gain + rng.normal(0, 0.01, n)).round(4).tolist(),
        "dc-error": (noise * (0.9 if interpolation else 1.1) * rng.uniform(0.95, 1.05, n)).round(5).tolist(),
        "hf-excess": (np.zeros(n) if interpolation else rng.uniform(0.01, 0.08, n)).round(4).tolist(),
    }


def _write_metrics(run_dir: Path, names: list[str], holdout: bool, rng: np.random.Generator) -> None:
    """metrics.jsonl: train rows (rounds 1..) and evaluate rows (round 0..) per site, per experiment.

    Federation rows carry no ``experiment`` key (as RunRecorder wrote them before experiments existed).
    """
    experiments = {"global": names}
    if holdout:
        experiments.update({f"holdout:{s}": [t for t in names if t != s] for s in names})
    rows, clock = [], 0.0
    for experiment, members in experiments.items():
        tag = {} if experiment == "global" else {"experiment": experiment}
        baseline_psnr = {site: rng.uniform(27.0, 31.0) for site in members}
        for round_ in range(ROUNDS + 1):
            for phase in ("train", "evaluate") if round_ else ("evaluate",):
                for site in members:
                    clock += rng.uniform(0.5, 2.0)
                    row = {"round": round_, "phase": phase, "site": site, "time": round(clock, 3),
                           "baseline": "bicubic", **tag}
                    row.update(_train_row(round_, rng) if phase == "train"
                               else _evaluate_row(round_, baseline_psnr[site], rng))
                    rows.append(json.dumps(row))
    atomic_write_text(run_dir / "metrics.jsonl", "\n".join(rows) + "\n")


def _train_row(round_: int, rng: np.random.Generator) -> dict:
    return {"num-examples": 640, "train-loss": round(0.05 / round_ + rng.uniform(0, 0.005), 5),
            "train-patches": 640, "train-seconds": round(rng.uniform(5, 9), 3)}


def _evaluate_row(round_: int, baseline_psnr: float, rng: np.random.Generator) -> dict:
    psnr = baseline_psnr - 6.0 + 3.0 * round_ + rng.normal(0, 0.2)  # the untrained model is worse than bicubic
    return {
        "psnr": round(psnr, 3), "ssim": round(0.80 + 0.012 * (psnr - 27.0), 4),
        "nrmse": round(4 * 10 ** (-psnr / 20), 5),
        "hfen": round(0.40 - 0.02 * round_, 4), "baseline-psnr": round(baseline_psnr, 3),
        "baseline-ssim": round(0.80 + 0.012 * (baseline_psnr - 27.0), 4),
        "baseline-nrmse": round(4 * 10 ** (-baseline_psnr / 20), 5), "baseline-hfen": 0.35,
        "num-val-scans": 2, "num-val-slices": 96, "eval-seconds": round(rng.uniform(0.8, 1.6), 3),
    }


def _write_preview(path: Path, models: list[str], scale: int, rng: np.random.Generator) -> None:
    """One smooth random HR crop, its LR (block mean), interpolation (cubic zoom) and one SR per model."""
    side = PREVIEW_SIDE * scale
    hr = gaussian_filter(rng.random((side, side)), 2.5)
    hr = ((hr - hr.min()) / (np.ptp(hr) or 1.0)).astype(np.float32)
    lr = hr.reshape(PREVIEW_SIDE, scale, PREVIEW_SIDE, scale).mean(axis=(1, 3))
    interpolation = np.clip(zoom(lr, scale, order=3), 0, 1)
    arrays = {"lr": lr, "interpolation": interpolation, "hr": hr}
    for model in models:
        if model != "interpolation":
            arrays[f"sr:{model}"] = np.clip(hr + rng.normal(0, 0.02, hr.shape), 0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: np.savez(handle, **{k: v.astype(np.float32) for k, v in arrays.items()}))
