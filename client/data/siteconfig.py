"""A site's settings, from the optional ``site.toml`` in its folder (defaults when absent).

Example ``site.toml`` (every key optional)::

    name = "st-elsewhere"          # default: the folder name
    modality = "MR"                # "MR" | "CT"; default: the DICOM series' modality, else "MR"
    scanner = "Siemens Prisma 3T"
    supervision = "paired"         # "paired" | "self"
    share_local_model = false      # may the model trained on this site alone leave it, to be scored at the others
    share_previews = false         # may small example crops of this site's test scans go into the run's report
    max_voxels = 300_000_000       # larger scans are skipped before they are read (512 x 512 x 1000 fits)

    [acquisition]                  # passed as is to client.degrade.profile_from_config
    profile = "mr-3t-kspace"

    [subject]                      # NIfTI scan id (as `fedsr sites check` lists it) -> patient
    "sub-01/anat/sub-01_run-1_T1w" = "sub-01"
    "sub-01/anat/sub-01_run-2_T1w" = "sub-01"

    [split]                        # by patient: every scan of a patient goes to its patient's split
    seed = 0
    fractions = [0.6, 0.2, 0.2]    # train, val, test (shares of the patients)
    # or name the patients; unlisted patients go to train:
    # val = ["sub-03"]
    # test = ["sub-04", "sub-05"]

    [normalisation]
    ct_window = [-160.0, 240.0]    # HU mapped to [0, 1]
    mr_percentiles = [0.5, 99.5]   # % of foreground voxels mapped to [0, 1]

    [policy]                       # what this site accepts from the coordinator (SitePolicy; defaults shown)
    min_batch_size = 8             # fewest patches per optimiser step (the coordinator's batch-size)
    min_local_steps = 10           # fewest optimiser steps per round (local-steps)
    max_rounds = 200               # most rounds of one model (num-rounds, server-round)
    # allowed_models = ["edsr", "srcnn"]   # default: every registered model family
    # allowed_losses = ["l1", "ssim"]      # default: every loss term

A scan's patient: for DICOM its PatientID (else its SeriesInstanceUID); for NIfTI its ``[subject]`` entry, else
the BIDS ``sub-<label>`` folder or file-name prefix, else the scan itself.
    [privacy]                      # differential privacy the site requires (SitePrivacy; client/privacy.py)
    required = false               # refuse training rounds without DP-SGD
    epsilon_budget = 8.0           # most epsilon per patient, over all rounds and runs (implies required)
    delta = 1e-5

Unknown keys are refused rather than ignored, so that no site believes a protection is on when it is not.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, NoReturn

from client.data.errors import SiteError
from client.data.files import SITE_CONFIG_NAME
from client.data.split import SPLITS
from client.data.volume import DEFAULT_MAX_VOXELS, MODALITIES

_TOP_KEYS = (
    "name", "modality", "scanner", "supervision", "share_local_model", "share_previews", "max_voxels",
    "acquisition", "subject", "split", "normalisation", "policy", "privacy",
)
_SPLIT_KEYS = ("seed", "fractions", *SPLITS)
SUPERVISION = ("paired", "self")
_NORMALISATION_KEYS = ("ct_window", "mr_percentiles")
_PRIVACY_KEYS = ("required", "epsilon_budget", "delta")
_POLICY_KEYS = ("min_batch_size", "min_local_steps", "max_rounds", "allowed_models", "allowed_losses")


@dataclass(frozen=True)
class SitePrivacy:
    """What the site requires of differential privacy (``[privacy]``; :mod:`client.privacy`).

    ``required``: refuse every training round that is not DP-SGD (``dp = "local"``). ``epsilon_budget``: the most
    epsilon (per privacy unit, at ``delta``) the site's ledger may reach, over all rounds and runs until an
    operator resets it; a budget implies ``required`` (a round without DP spends an unbounded epsilon). None: no
    cap (the ledger still records every DP round). ``delta``: the delta of the site's guarantee (default 1e-5;
    keep it well below 1 / the number of patients).
    """

    required: bool = False
    epsilon_budget: float | None = None
    delta: float = 1e-5

    @property
    def dp_required(self) -> bool:
        return self.required or self.epsilon_budget is not None


@dataclass(frozen=True)
class SitePolicy:
    """The run settings this site accepts from the coordinator (``[policy]``); :func:`client.policy.check_policy`
    refuses a request outside them, with a reason the coordinator shows.

    The defaults are safe, not permissive. ``min_batch_size`` (patches per optimiser step, the coordinator's
    ``batch-size``), default 8: one step on a batch of one patch sends that patch's gradient, from which the patch
    can be reconstructed (gradient inversion); a mean over many patches is much harder to invert.
    ``min_local_steps`` (optimiser steps per round, ``local-steps``), default 10: the update then mixes the gradients
    of many batches. Neither makes inversion impossible: differential privacy bounds it.
    ``max_rounds``: the most rounds of one model the site trains (the run's ``num-rounds``, and no ``server-round``
    above it), default 200: each round sends one more update computed from the site's data, so a finite number
    bounds what one model collects; 200 is 40 times the default run's 5 rounds; a site agreeing to longer runs
    raises it.
    ``allowed_models``: the model families the site trains and scores; None (the default) allows every registered
    family. ``allowed_losses``: the terms the ``loss`` setting may name (``shared_models.losses.LOSS_TERMS``);
    None allows every term.
    The issue's other two site choices are kept where they already are: whether previews and the local-only model
    may leave the site are the top-level ``share_previews`` and ``share_local_model``; whether differential privacy
    is required is ``[privacy] required``.
    """

    min_batch_size: int = 8
    min_local_steps: int = 10
    max_rounds: int = 200
    allowed_models: tuple[str, ...] | None = None
    allowed_losses: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SiteConfig:
    """One site's settings.

    ``modality_source``: where ``modality`` came from: "site.toml", "dicom" (the site's series), "intensities"
    (a site of NIfTI scans only: inferred from their voxels, with a warning) or "default" (before the scans are read).
    ``supervision``: "paired" (HR scans; LR is synthesised from them) or "self" (only thick-slice scans: the
    site trains the self-supervised ``smore`` model from its own in-plane resolution).
    ``share_local_model``: whether this site's local-only baseline model may leave the site to be scored at the
    other sites. ``share_previews``: whether small example crops of its test scans may go into the run's report.
    Both default to False: nothing but weights of the federated model and numbers leaves without consent.
    ``max_voxels``: the most voxels of one scan; a larger scan is skipped, with its reason, before it is read.
    ``subject_map``: NIfTI scan id -> patient id (``[subject]``), the scans' grouping for the split.
    ``split_fractions``: (train, val, test) shares of the patients, summing to 1. ``split_subjects``: explicit
    patient lists by split name ("train", "val", "test"), or None to split by fractions with ``split_seed``.
    ``ct_window``: HU (lo, hi) mapped to [0, 1]. ``mr_percentiles``: (lo, hi) in % of foreground voxels.
    ``acquisition`` is the raw table, checked by its consumer (:func:`client.degrade.profile_from_config`).
    ``policy``: the run settings the site accepts (``[policy]``, :class:`SitePolicy`). ``privacy``: what it
    requires of differential privacy (``[privacy]``, :class:`SitePrivacy`).
    """

    name: str
    modality: str = "MR"
    modality_source: str = "default"
    scanner: str = ""
    supervision: str = "paired"
    share_local_model: bool = False
    share_previews: bool = False
    max_voxels: int = DEFAULT_MAX_VOXELS
    acquisition: dict[str, Any] = field(default_factory=dict)
    subject_map: dict[str, str] = field(default_factory=dict)
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_subjects: dict[str, tuple[str, ...]] | None = None
    ct_window: tuple[float, float] = (-160.0, 240.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    policy: SitePolicy = field(default_factory=SitePolicy)
    privacy: SitePrivacy = field(default_factory=SitePrivacy)


def load_site_config(site_dir: str | PathLike[str]) -> SiteConfig:
    """Read ``site_dir/site.toml`` (defaults when absent).

    Raises :class:`SiteError` naming site.toml on invalid TOML, unknown or not-yet-supported keys, or bad values.
    """
    site_dir = Path(site_dir)
    path = site_dir / SITE_CONFIG_NAME
    if not path.is_file():
        return parse_site_config({}, path, site_dir.name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteError(path, f"is not valid TOML ({exc})", "fix the syntax (see https://toml.io)") from exc
    return parse_site_config(data, path, site_dir.name)


def parse_site_config(data: dict[str, Any], path: str | PathLike[str], default_name: str) -> SiteConfig:
    """Build a :class:`SiteConfig` from parsed TOML ``data``; ``path`` (site.toml) is named in errors.

    Without a ``modality`` key the config says "MR" with ``modality_source`` "default";
    :func:`client.data.site.load_site` replaces it with the modality of the site's DICOM series, if any.
    """
    check = _Checker(Path(path))
    check.known_keys(data, _TOP_KEYS, "")
    split = check.table(data, "split")
    check.known_keys(split, _SPLIT_KEYS, "[split]")
    normalisation = check.table(data, "normalisation")
    check.known_keys(normalisation, _NORMALISATION_KEYS, "[normalisation]")
    policy = check.table(data, "policy")
    check.known_keys(policy, _POLICY_KEYS, "[policy]")
    privacy = check.table(data, "privacy")
    check.known_keys(privacy, _PRIVACY_KEYS, "[privacy]")
    modality = check.string(data, "modality", "MR").upper()
    if modality not in MODALITIES:
        check.fail(f"modality {data['modality']!r} is not supported", f"use one of {', '.join(MODALITIES)}")
    supervision = check.string(data, "supervision", "paired")
    if supervision not in SUPERVISION:
        check.fail(f"supervision {supervision!r} is not supported", f"use one of {', '.join(SUPERVISION)}")
    return SiteConfig(
        name=check.string(data, "name", default_name),
        modality=modality,
        modality_source="site.toml" if "modality" in data else "default",
        scanner=check.string(data, "scanner", ""),
        supervision=supervision,
        share_local_model=check.boolean(data, "share_local_model"),
        share_previews=check.boolean(data, "share_previews"),
        max_voxels=check.at_least_one(data, "max_voxels", DEFAULT_MAX_VOXELS, ""),
        acquisition=check.table(data, "acquisition"),
        subject_map=check.subject_map(check.table(data, "subject")),
        split_seed=check.integer(split, "seed", 0),
        split_fractions=check.fractions(split),
        split_subjects=check.subject_lists(split),
        ct_window=check.pair(normalisation, "ct_window", (-160.0, 240.0), (-math.inf, math.inf)),
        mr_percentiles=check.pair(normalisation, "mr_percentiles", (0.5, 99.5), (0.0, 100.0)),
        policy=check.policy(policy),
        privacy=check.privacy(privacy),
    )


class _Checker:
    """Type checks for site.toml values; every failure is a :class:`SiteError` naming the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, problem: str, hint: str) -> NoReturn:
        raise SiteError(self.path, problem, hint)

    def known_keys(self, data: dict[str, Any], known: tuple[str, ...], where: str) -> None:
        for key in data:
            if key not in known:
                self.fail(
                    f"unknown key {key!r}{' in ' + where if where else ''}",
                    f"known keys: {', '.join(known)}; check the spelling",
                )

    def _typed(self, data: dict[str, Any], key: str, kind: type, what: str, default: Any) -> Any:
        value = data.get(key, default)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # bool subclasses int
            self.fail(f"{key} must be {what}, got {value!r}", f"fix the value of {key}")
        return value

    def boolean(self, data: dict[str, Any], key: str) -> bool:
        """A consent switch: TOML ``true`` or ``false`` (never a string or number), default False."""
        return self._typed(data, key, bool, "true or false (no quotes)", False)

    def string(self, data: dict[str, Any], key: str, default: str | None = None) -> str:
        return self._typed(data, key, str, "a string", default)

    def integer(self, data: dict[str, Any], key: str, default: int) -> int:
        return self._typed(data, key, int, "an integer", default)

    def at_least_one(self, data: dict[str, Any], key: str, default: int, where: str) -> int:
        """An integer >= 1; ``where`` ("[policy] " or "") prefixes the key in the message."""
        value = self.integer(data, key, default)
        if value < 1:
            self.fail(f"{where}{key} must be at least 1, got {value}", f"write e.g. {key} = {default}")
        return value

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        return self._typed(data, key, dict, f"a table ([{key}])", {})

    def pair(
        self, data: dict[str, Any], key: str, default: tuple[float, float], bounds: tuple[float, float]
    ) -> tuple[float, float]:
        value = data.get(key, list(default))
        if not (_numbers(value, 2) and bounds[0] <= value[0] < value[1] <= bounds[1]):
            self.fail(
                f"{key} must be two increasing numbers within {bounds}, got {value!r}",
                f"write e.g. {key} = {list(default)}",
            )
        return float(value[0]), float(value[1])

    def fractions(self, split: dict[str, Any]) -> tuple[float, float, float]:
        value = split.get("fractions", [0.6, 0.2, 0.2])
        if not (_numbers(value, 3) and min(value) >= 0 and math.isclose(sum(value), 1.0, abs_tol=1e-6)):
            self.fail(
                f"[split] fractions must be three numbers >= 0 (train, val, test) summing to 1, got {value!r}",
                "write e.g. fractions = [0.6, 0.2, 0.2]",
            )
        return float(value[0]), float(value[1]), float(value[2])

    def subject_map(self, table: dict[str, Any]) -> dict[str, str]:
        """``[subject]``: scan id -> patient id, every value a non-empty string."""
        for scan, patient in table.items():
            if not (isinstance(patient, str) and patient.strip()):
                self.fail(
                    f"[subject] {scan!r} must map to a patient id (a non-empty string), got {patient!r}",
                    f'write e.g. "{scan}" = "sub-01"',
                )
        return dict(table)

    def privacy(self, table: dict[str, Any]) -> SitePrivacy:
        """``[privacy]``: a boolean, a positive budget, a delta in (0, 1)."""
        budget = table.get("epsilon_budget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            self.fail(f"[privacy] epsilon_budget must be a positive number, got {budget!r}",
                      "write e.g. epsilon_budget = 8.0, or remove it for no cap")
        delta = table.get("delta", SitePrivacy.delta)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            self.fail(f"[privacy] delta must be a number in (0, 1), got {delta!r}", "write e.g. delta = 1e-5")
        return SitePrivacy(required=self.boolean(table, "required"),
                           epsilon_budget=None if budget is None else float(budget), delta=float(delta))

    def policy(self, table: dict[str, Any]) -> SitePolicy:
        """``[policy]``: counts >= 1, names of registered model families and of loss terms."""
        default = SitePolicy()
        counts = {key: self.at_least_one(table, key, getattr(default, key), "[policy] ")
                  for key in ("min_batch_size", "min_local_steps", "max_rounds")}
        return SitePolicy(**counts, allowed_models=self.names(table, "allowed_models", _model_families),
                          allowed_losses=self.names(table, "allowed_losses", _loss_terms))

    def names(self, table: dict[str, Any], key: str, known: Callable[[], Collection[str]]) -> tuple[str, ...] | None:
        """A ``[policy]`` list of names, each one of ``known()`` (asked only when the key is there); None if absent."""
        if key not in table:
            return None
        value = table[key]
        if not (isinstance(value, list) and value and all(isinstance(name, str) for name in value)):
            self.fail(f"[policy] {key} must be a non-empty list of names, got {value!r}",
                      f"list what the site accepts, or remove {key} to accept every one")
        unknown = sorted(set(value) - set(known()))
        if unknown:
            self.fail(f"[policy] {key} names {', '.join(map(repr, unknown))}, which this installation does not have",
                      f"use names from: {', '.join(sorted(known()))}")
        return tuple(dict.fromkeys(value))

    def subject_lists(self, split: dict[str, Any]) -> dict[str, tuple[str, ...]] | None:
        named = {name: split[name] for name in SPLITS if name in split}
        if not named:
            return None
        if "fractions" in split:
            self.fail("[split] has both fractions and subject lists", "keep one of them")
        seen: dict[str, str] = {}
        for name, subjects in named.items():
            if not (isinstance(subjects, list) and all(isinstance(s, str) for s in subjects)):
                self.fail(
                    f"[split] {name} must be a list of patient ids (strings), got {subjects!r}",
                    f'write e.g. {name} = ["sub-01"]',
                )
            for subject in subjects:
                if seen.setdefault(subject, name) != name:
                    self.fail(f"[split] patient {subject!r} is in both {seen[subject]} and {name}", "keep one")
        return {name: tuple(named.get(name, [])) for name in SPLITS}


def _model_families() -> Collection[str]:
    """The registered model families. Imported here, only for a site.toml that lists ``allowed_models``: the
    registry imports every network (torch), which reading a site's data otherwise never needs."""
    from shared_models.registry import families

    return families().keys()


def _loss_terms() -> Collection[str]:
    """The loss terms (imported here for the same reason as :func:`_model_families`)."""
    from shared_models.losses import LOSS_TERMS

    return LOSS_TERMS.keys()


def _numbers(value: Any, count: int) -> bool:
    """``value`` is a list of ``count`` numbers (TOML booleans excluded)."""
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
