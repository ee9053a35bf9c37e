"""What a Flower strategy carries from one round to the next, as plain values a checkpoint can hold.

A resumed run must go on exactly as if it had never stopped, so the round checkpoint holds, beside the global
weights, the state of the strategy that aggregates them: FedAdam's and FedYogi's server-optimiser moments
(``m_t``, ``v_t``: ``{key: array}`` of the global weights' shapes, None before the first round), and the clipping
norm Flower's adaptive central-DP wrappers learn (``clipping_norm``). Everything else a Flower strategy holds is
either fixed by the run settings or set again by each round's ``configure_train`` (``current_arrays``).

The state is ``{strategy class name: {attribute: value}}`` over the strategy and those it wraps (Flower's DP
wrappers hold theirs as ``.strategy``). In its plain form (:func:`plain_state`), arrays are base64 text of their
``.npy`` bytes: exact (dtype and shape kept), and within the plain values ``shared_models.checkpoint`` stores.
"""

from __future__ import annotations

import base64
import copy
import io
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

#: The attributes in which Flower's strategies keep what lasts from one round to the next (see the module doc).
LASTING = ("m_t", "v_t", "clipping_norm")

State = dict[str, dict[str, Any]]


def _chain(strategy: Strategy) -> Iterator[Strategy]:
    """``strategy`` and every strategy it wraps, outermost first."""
    current: Strategy | None = strategy
    while current is not None:
        yield current
        current = getattr(current, "strategy", None)


def lasting_state(strategy: Strategy) -> State:
    """A copy of what ``strategy`` (and those it wraps) carry to the next round: ``{class name: {attribute:
    value}}``, only the classes that have any."""
    state = {type(s).__name__: {name: copy.deepcopy(getattr(s, name)) for name in LASTING if hasattr(s, name)}
             for s in _chain(strategy)}
    return {name: attributes for name, attributes in state.items() if attributes}


def restore_state(strategy: Strategy, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Put ``state`` (from :func:`lasting_state`) back into ``strategy`` and those it wraps.

    Raises:
        ValueError: ``state`` names a strategy that is not there (it was saved by a run of another strategy).
    """
    chain = {type(s).__name__: s for s in _chain(strategy)}
    unknown = sorted(set(state) - set(chain))
    if unknown:
        raise ValueError(f"strategy state of {unknown}, but this run's strategy is {', '.join(chain)}")
    for name, attributes in state.items():
        for attribute, value in attributes.items():
            setattr(chain[name], attribute, copy.deepcopy(value))


def plain_state(state: State) -> dict[str, dict[str, Any]]:
    """``state`` with every ``{key: array}`` value as ``{key: base64 .npy text}`` (floats and None as they are)."""
    return {name: {attribute: _encoded(value) for attribute, value in attributes.items()}
            for name, attributes in state.items()}


def state_from_plain(plain: Mapping[str, Mapping[str, Any]]) -> State:
    """The state :func:`plain_state` was made from, arrays bit for bit."""
    return {name: {attribute: _decoded(value) for attribute, value in attributes.items()}
            for name, attributes in plain.items()}


def _encoded(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    encoded = {}
    for key, array in value.items():
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array), allow_pickle=False)
        encoded[key] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return encoded


def _decoded(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    return {key: np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False) for key, text in value.items()}
