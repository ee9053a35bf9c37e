"""Train / validation / test assignment by patient, never by scan or slice: every scan of a patient goes to its
patient's split, so no patient's anatomy is both trained on and tested on.

Patient ids can be DICOM PatientIDs: the logs here give counts, and name only ids that a site.toml wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_subjects(
    patients: Sequence[str], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[str]]:
    """Shuffle the patients with ``seed`` and cut them by ``fractions`` (train, val, test).

    Deterministic: depends only on the set of patients, the fractions and the seed (not on input order).
    With >= 2 patients, val and train get at least one each (test gives way first), so a test split needs
    >= 3 patients. With one patient it is both train and val (a warning is logged), since a site cannot be
    validated otherwise. Returns {"train": [...], "val": [...], "test": [...]}, each sorted.
    ValueError on repeated patients.
    """
    unique = sorted(set(patients))
    if len(unique) != len(patients):
        raise ValueError(f"patient ids must be unique, got {len(patients) - len(unique)} repeats")
    n = len(unique)
    if n <= 1:
        if n == 1:
            log.warning("only one patient: its scans are used for both training and validation, none for testing")
        return {"train": list(unique), "val": list(unique), "test": []}
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, _rounded(n * fractions[1])), n - 1)
    n_test = max(0, min(_rounded(n * fractions[2]), n - n_val - 1))
    shuffled = [unique[i] for i in order]
    parts = {
        "val": shuffled[:n_val],
        "test": shuffled[n_val : n_val + n_test],
        "train": shuffled[n_val + n_test :],
    }
    return {name: sorted(parts[name]) for name in SPLITS}


def explicit_split(patients: Sequence[str], lists: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Assign patients by name: ``lists`` maps "train" / "val" / "test" to patient ids (site.toml's [split]).

    Patients in no list go to train (their number is logged); listed ids that are not present are logged as
    warnings. Returns {"train": [...], "val": [...], "test": [...]}, each sorted.
    """
    present = set(patients)
    assignment = {patient: name for name in SPLITS for patient in lists.get(name, ())}
    missing = sorted(set(assignment) - present)
    if missing:
        log.warning("split lists name patients that are not in the site: %s", ", ".join(missing))
    unlisted = len(present - set(assignment))
    if unlisted:
        log.info("%d patients in no split list go to train", unlisted)
    parts: dict[str, list[str]] = {name: [] for name in SPLITS}
    for patient in sorted(present):
        parts[assignment.get(patient, "train")].append(patient)
    if not parts["val"]:
        log.warning("the split lists leave no patient for validation")
    return parts


def _rounded(x: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return int(np.floor(x + 0.5))
