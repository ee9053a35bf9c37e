"""Train / validation / test assignment by subject (one scan), never by slice, so no scan leaks across splits."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_subjects(
    subjects: Sequence[str], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[str]]:
    """Shuffle the subjects with ``seed`` and cut them by ``fractions`` (train, val, test).

    Deterministic: depends only on the set of subjects, the fractions and the seed (not on input order).
    With >= 2 subjects, val and train get at least one each (test gives way first). With one subject it is
    both train and val (a warning is logged), since a site cannot be validated otherwise.
    Returns {"train": [...], "val": [...], "test": [...]}, each sorted. ValueError on repeated subjects.
    """
    unique = sorted(set(subjects))
    if len(unique) != len(subjects):
        raise ValueError(f"subject ids must be unique, got repeats in {sorted(subjects)}")
    n = len(unique)
    if n <= 1:
        if n == 1:
            log.warning("only one subject (%s): it is used for both training and validation", unique[0])
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


def explicit_split(subjects: Sequence[str], lists: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Assign subjects by name: ``lists`` maps "train" / "val" / "test" to subject ids.

    Subjects in no list go to train (logged); listed ids that are not present are logged as warnings.
    Returns {"train": [...], "val": [...], "test": [...]}, each sorted.
    """
    present = set(subjects)
    assignment = {subject: name for name in SPLITS for subject in lists.get(name, ())}
    missing = sorted(set(assignment) - present)
    if missing:
        log.warning("split lists name subjects that are not in the site: %s", ", ".join(missing))
    unlisted = sorted(present - set(assignment))
    if unlisted:
        log.info("subjects in no split list go to train: %s", ", ".join(unlisted))
    parts: dict[str, list[str]] = {name: [] for name in SPLITS}
    for subject in sorted(present):
        parts[assignment.get(subject, "train")].append(subject)
    if not parts["val"]:
        log.warning("the split lists leave no subject for validation")
    return parts


def _rounded(x: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return int(np.floor(x + 0.5))
