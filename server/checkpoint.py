"""Checkpoints of the global model in the run folder (atomic: readers never see half a file), and resuming from them.

Every federation keeps its latest completed round (:func:`write_global` with its ``experiment`` name): the run's
main federated model in ``checkpoint.pt``, any other (leave-one-out: one per held-out site) in
``checkpoints/holdout-SITE.pt``. A stopped run continues from them (``resume``): :func:`completed_rounds` reads
them back, :func:`resumed_recorder` trims the run record to the rounds they hold.

A round checkpoint holds what a federation needs to go on exactly as it would have: the weights, the round number
and the state the strategy carries between rounds (FedAdam's and FedYogi's moments, an adaptive DP clipping norm:
``server.strategy_state``, in ``extra["strategy"]``). The sites derive their seeds from (run seed, site, round), and
the coordinator's only random draw, the sites a round samples with a fraction below 1, is seeded by (run seed,
round). Which sites were missing is not kept: a resumed run waits for every site once more.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from torch import nn

from server.run_log import ResumeError, RunRecorder
from server.settings import RunSettings
from shared_models.checkpoint import load_checkpoint, save_checkpoint
from shared_models.registry import family_of, model_spec
from shared_models.settings import FamilyOptions

log = logging.getLogger(__name__)

LAST = "checkpoint.pt"
FINAL = "final_model.pt"
#: Sub-folder of the run folder for the round checkpoints of every federation besides the main one.
CHECKPOINTS = "checkpoints"


def load_global(model: nn.Module, arrays: ArrayRecord, options: FamilyOptions | None) -> nn.Module:
    """Load the global weights into ``model``: exactly the keys its family sends between sites and coordinator
    with these ``options``. Weights a family keeps at the sites (e.g. a discriminator that never travels) keep
    their initial values here."""
    expected = set(family_of(model).shared_state(model, options))
    state = arrays.to_torch_state_dict()
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"global weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)  # shapes are still checked
    return model


def write_global(
    run_dir: Path,
    model: nn.Module,
    arrays: ArrayRecord,
    *,
    settings: RunSettings,
    normalisation: dict[str, Any],
    name: str,
    round_: int,
    export: bool | None = None,
    experiment: str | None = None,
    strategy_state: Mapping[str, Any] | None = None,
) -> Path:
    """Save the global weights as ``run_dir/name`` with the round in its metadata; a round checkpoint also names
    its federation (``experiment``) and holds its strategy's state (``strategy_state``: plain values,
    ``SiteStrategy.state``), to be resumed from (:func:`read_round`).

    ``normalisation``: how the sites mapped their scans to [0, 1] (``{site: {"modality", "kind", "range"}}``, as
    they reported it), so that the model can be applied to a new scan, and its output mapped back, the same way.
    The round checkpoint holds the whole model (for resuming); a finished model (``export``, default: the name is
    :data:`FINAL`) is what the family exports (e.g. a generator alone when a discriminator trained beside it: what is
    evaluated and applied).
    """
    load_global(model, arrays, settings.family_options)
    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
    to_save = family_of(model).export(model) if (name == FINAL if export is None else export) else model
    extra: dict[str, Any] = {"round": round_}
    if experiment is not None:
        extra["experiment"] = experiment
    if strategy_state:
        extra["strategy"] = dict(strategy_state)
    return save_checkpoint(run_dir / name, to_save, scale=settings.scale, normalisation=normalisation, extra=extra)


@dataclass(frozen=True)
class RoundState:
    """A federation's last completed round as its checkpoint (``path``) holds it.

    ``model``: the whole model after that round; ``normalisation``: the sites' intensity rules (see
    :func:`write_global`); ``strategy``: the strategy's state after that round (plain values; empty for a strategy
    that keeps none).
    """

    experiment: str
    round: int
    path: Path
    model: nn.Module
    normalisation: dict[str, Any]
    strategy: Mapping[str, Any] = field(default_factory=dict)

    def arrays(self, model: nn.Module, options: FamilyOptions | None) -> ArrayRecord:
        """The global weights to go on from, as the federation sends them (the family's ``shared_state`` with
        ``options``), checked to be of ``model``'s architecture (the run's settings build ``model``)."""
        stored, wanted = model_spec(self.model), model_spec(model)
        if stored != wanted:
            raise ResumeError(self.path, f"holds the model {stored}, the run's settings build {wanted}",
                              "resume with the settings of the run's config.toml")
        return ArrayRecord(family_of(self.model).shared_state(self.model, options))


def read_round(path: Path) -> RoundState:
    """The round state in the checkpoint at ``path``; a ResumeError (or CheckpointError) naming the file when it
    cannot be resumed from."""
    model, meta = load_checkpoint(path)
    extra = meta["extra"]
    if "experiment" not in extra:
        raise ResumeError(path, "names no federation round to resume from (a finished model, or one written by an "
                          "older fedsr)", "start the run again without resume")
    return RoundState(extra["experiment"], int(extra["round"]), path, model, meta["normalisation"] or {},
                      extra.get("strategy", {}))


def completed_rounds(run_dir: Path) -> dict[str, RoundState]:
    """Every federation's last completed round in ``run_dir`` (``{experiment: state}``): :data:`LAST`, which must
    be there, and the checkpoints in :data:`CHECKPOINTS`. A federation without one had completed no round."""
    main = run_dir / LAST
    if not main.is_file():
        raise ResumeError(main, "not there: the run stopped before its first round completed, or this is not a "
                          "run folder", "start the run again without resume")
    states = [read_round(path) for path in (main, *sorted((run_dir / CHECKPOINTS).glob("*.pt")))]
    return {state.experiment: state for state in states}


def resume_points(states: Mapping[str, RoundState]) -> str:
    """Where each federation goes on, for the log and the terminal: ``global after round 2, ...``."""
    return ", ".join(f"{name} after round {state.round}" for name, state in states.items())


def resumed_recorder(run_dir: Path, states: Mapping[str, RoundState]) -> RunRecorder:
    """The record of a run that goes on after ``states``: ``metrics.jsonl`` without the rows of unfinished rounds
    (:meth:`RunRecorder.resume`), and the sites' intensity rules as the checkpoints kept them (a federation that
    is already complete receives no reply to learn them from)."""
    recorder = RunRecorder(run_dir)
    dropped = recorder.resume({name: state.round for name, state in states.items()})
    for state in states.values():
        recorder.normalisation.update(state.normalisation)
    if dropped:
        log.info("%s: %d row(s) of rounds that did not complete dropped", recorder.path, dropped)
    return recorder
