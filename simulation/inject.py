"""Fault injection in simulation: one site's replies corrupted on purpose, to see what a strategy survives.

``fedsr simulate --inject SITE:KIND`` (repeatable) names a site (its site.toml name or its folder's name) and a
fault. The simulation runner adds :class:`InjectionMod`, a Flower client mod, to the ClientApp; it corrupts the
named site's reply after the site built it. Nothing of this is a run setting: it never reaches ``config.toml``, a
checkpoint or a real deployment (``client.app`` does not know of it). The run folder's ``injections.json`` records
the faults of the run (:func:`write_injections`), and ``--resume`` reads them back from it.

Kinds (``server-round`` is the round the coordinator's message names):

- ``nan``: every floating weight of the site's ``train`` replies is NaN; the ``psnr`` of its ``evaluate`` replies
  is NaN.
- ``scale:F``: ``train`` weights ``global + F * (update - global)`` (``global``: the weights the site received),
  computed in float64 and cast back to each array's dtype (a float16 reply may overflow to Inf).
- ``random``: ``train`` weights replaced by N(0, 1) noise of the same shapes and dtypes (drawn from a generator
  seeded by the round and the site's partition: the same run injects the same noise).
- ``examples:N``: ``num-examples`` of ``train`` replies set to N (any number: ``nan``, ``inf``, ``-1``, ``1e300``).
- ``drop`` or ``drop:R``: from round R (default 1) on, every message whose ``server-round`` is R or later is
  answered with Flower's "node unavailable" error, as the SuperLink answers for a node that went away; the site
  still describes itself at the start (that message has no round). The baselines and the cross-site evaluation
  carry the last round, so a dropped site misses them too. Flower's simulation engine always produces a reply,
  so in simulation a dropped site shows as a failed site (an error reply), never as a silent one. Each federation
  of a run (``global``, ``holdout:SITE``) counts its rounds from 1.

Only floating arrays are corrupted (an integer buffer keeps its values). Replies that are errors or refusals pass
untouched, and so does every reply of the other sites.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from client.data.siteconfig import load_site_config
from server.run_log import atomic_write_text
from shared_models.errors import ExplainedError

log = logging.getLogger(__name__)

#: Every kind of fault, with the value it takes (None: none).
KINDS: dict[str, str | None] = {"nan": None, "scale": "F", "random": None, "examples": "N", "drop": "R"}
#: The run folder's record of the faults injected into its run.
INJECTIONS_FILE = "injections.json"
#: How to write an injection, for error messages and the option's help.
SYNTAX = "SITE:KIND with KIND one of nan, scale:F, random, examples:N, drop, drop:R"


@dataclass(frozen=True)
class Injection:
    """One fault at one site: ``kind`` (a :data:`KINDS` key) and its ``value`` (scale: the factor F; examples: the
    count N; drop: the first round R; None for nan and random)."""

    site: str
    kind: str
    value: float | None = None

    @property
    def spec(self) -> str:
        """The injection as ``--inject`` takes it: ``site-1:scale:100``."""
        return self.site + ":" + self.kind + ("" if self.value is None else ":" + _number(self.value))

    @property
    def effect(self) -> str:
        """One sentence saying what the fault does (the WARNING at the start of a run, ``injections.json``)."""
        return {
            "nan": "train weights and the evaluation psnr replaced by NaN",
            "scale": f"train update scaled: global + {_number(self.value)} x (update - global)",
            "random": "train weights replaced by N(0, 1) noise",
            "examples": f"train num-examples set to {_number(self.value)}",
            "drop": f"answers every message of round {_number(self.value)} on with an error (node unavailable)",
        }[self.kind]


def _number(value: float | None) -> str:
    """A value as the spec writes it, exactly (read back by :func:`parse_injection`): ``100``, ``1e+300``."""
    number = float(value or 0.0)
    return str(int(number)) if number.is_integer() and abs(number) < 1e16 else repr(number)


def parse_injection(spec: str) -> Injection:
    """``SITE:KIND[:VALUE]`` -> :class:`Injection` (the site as written; :func:`assign` checks it). The site name
    may itself hold ``:``: the kind is found from the right.

    Raises:
        ValueError: an unknown kind, a missing or superfluous value, a value of the wrong kind (scale: a finite
            number; examples: any number; drop: a whole round >= 1); the message quotes the spec and the syntax.
    """
    parts = spec.split(":")
    if len(parts) >= 3 and parts[-2] in KINDS:
        site, kind, value = ":".join(parts[:-2]), parts[-2], parts[-1]
    elif len(parts) >= 2 and parts[-1] in KINDS:
        site, kind, value = ":".join(parts[:-1]), parts[-1], None
    else:
        raise ValueError(f"--inject {spec!r}: no fault kind in it; write {SYNTAX}")
    if not site.strip():
        raise ValueError(f"--inject {spec!r}: no site named; write {SYNTAX}")
    return Injection(site, kind, _value(spec, kind, value))


def _value(spec: str, kind: str, text: str | None) -> float | None:
    """The checked value of ``kind`` (``text``: what followed it, None when nothing did)."""
    takes = KINDS[kind]
    if takes is None:
        if text is not None:
            raise ValueError(f"--inject {spec!r}: {kind} takes no value; write SITE:{kind}")
        return None
    if text is None:
        if kind == "drop":
            return 1.0
        raise ValueError(f"--inject {spec!r}: {kind} needs a value; write SITE:{kind}:{takes}, e.g. "
                         f"site-1:{kind}:{'100' if kind == 'scale' else '1e12'}")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--inject {spec!r}: {kind}'s {takes} must be a number, got {text!r}") from None
    if kind == "scale" and not math.isfinite(value):
        raise ValueError(f"--inject {spec!r}: scale's factor must be finite (use nan for non-finite weights)")
    if kind == "drop" and not (value.is_integer() and value >= 1):
        raise ValueError(f"--inject {spec!r}: drop's round must be a whole number >= 1, got {text!r}")
    return value


def assign(injections: Iterable[Injection], site_dirs: Sequence[str]) -> dict[int, tuple[Injection, ...]]:
    """The injections of each simulated site, by partition id (the index of its folder in ``site_dirs``, as the
    runner numbers the sites), each naming its site by its site.toml name.

    A site is found by its site.toml name, else by its folder's name (a folder whose site.toml cannot be read
    goes by its folder's name).

    Raises:
        ValueError: a site that is none of them (the message lists the sites), or one kind twice at a site.
    """
    names = [_site_name(folder) for folder in site_dirs]
    folders = [Path(folder).name for folder in site_dirs]
    assigned: dict[int, tuple[Injection, ...]] = {}
    for injection in injections:
        partition = _find(injection.site, names, folders)
        if partition is None:
            raise ValueError(f"--inject {injection.spec!r}: no site {injection.site!r} in this run; its sites are "
                             f"{', '.join(names)}")
        earlier = assigned.get(partition, ())
        if any(other.kind == injection.kind for other in earlier):
            raise ValueError(f"--inject {injection.spec!r}: site {names[partition]} has a {injection.kind} fault "
                             "already; give each kind once per site")
        assigned[partition] = (*earlier, replace(injection, site=names[partition]))
    return assigned


def _find(site: str, names: Sequence[str], folders: Sequence[str]) -> int | None:
    """Index of ``site`` among the site.toml ``names``, else among the ``folders``' names; None if in neither."""
    for candidates in (names, folders):
        if site in candidates:
            return list(candidates).index(site)
    return None


def _site_name(folder: str) -> str:
    try:
        return load_site_config(folder).name
    except ExplainedError:  # the run leaves such a site out; it can still be named by its folder
        return Path(folder).name


# ---------------------------------------------------------------------------------------------- the record
def write_injections(run_dir: Path, injections: Iterable[Injection]) -> Path:
    """``run_dir/injections.json`` (atomically): ``{"injections": [{"spec", "site", "kind", "value",
    "effect"}, ...]}``, what a user reads later to know that the run was sabotaged and how."""
    rows = [{"spec": i.spec, "site": i.site, "kind": i.kind, "value": i.value, "effect": i.effect}
            for i in injections]
    path = run_dir / INJECTIONS_FILE
    atomic_write_text(path, json.dumps({"simulation_only": True, "injections": rows}, indent=1) + "\n")
    return path


def read_injections(run_dir: Path) -> list[Injection]:
    """The injections :func:`write_injections` recorded in ``run_dir`` (none when it has no such file)."""
    path = run_dir / INJECTIONS_FILE
    if not path.is_file():
        return []
    return [parse_injection(row["spec"]) for row in json.loads(path.read_text(encoding="utf-8"))["injections"]]


# ------------------------------------------------------------------------------------------------- the mod
class InjectionMod:
    """Flower client mod: corrupts the replies of the simulated sites ``faults`` names (``{partition id:
    injections}``, from :func:`assign`) as the module docstring says; the other sites' replies pass untouched.

    A plain class (no closure) so that Ray can send it to its worker processes.
    """

    def __init__(self, faults: Mapping[int, Sequence[Injection]]) -> None:
        self.faults = {int(partition): tuple(injections) for partition, injections in faults.items()}

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        partition = int(context.node_config.get("partition-id", -1))
        faults = self.faults.get(partition, ())
        if not faults:
            return call_next(msg, context)
        server_round = message_round(msg)
        for fault in faults:
            if fault.kind == "drop" and server_round is not None and server_round >= (fault.value or 1):
                log.warning("injected fault at %s: %s of round %d dropped (%s)", fault.site,
                            msg.metadata.message_type, server_round, fault.spec)
                return Message(Error(code=ErrorCode.NODE_UNAVAILABLE,
                                     reason=f"injected fault {fault.spec}: the site went away"), reply_to=msg)
        reply = call_next(msg, context)
        if reply.has_error() or msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
            return reply
        for fault in faults:
            if corrupt(reply, msg, fault, partition):
                log.warning("injected fault at %s: %s reply of round %s corrupted (%s)", fault.site,
                            msg.metadata.message_type, server_round, fault.spec)
        return reply


def message_round(msg: Message) -> int | None:
    """The ``server-round`` the message's config names; None for a message without one (``query.describe``)."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if config is None or "server-round" not in config:
        return None
    return int(config["server-round"])


def corrupt(reply: Message, sent: Message, fault: Injection, partition: int) -> bool:
    """Apply ``fault`` to ``reply``, the site's answer to ``sent``, in place. A refusal (no weights, no metrics), a
    reply a fault does not concern (an evaluation, for all but nan) and ``drop`` (which :class:`InjectionMod`
    applies by answering instead of the site) leave it as it is. Returns whether the reply changed."""
    content = reply.content
    if sent.metadata.message_type == MessageType.EVALUATE:
        if fault.kind != "nan" or "metrics" not in content.metric_records or "psnr" not in content["metrics"]:
            return False
        content["metrics"]["psnr"] = float("nan")
        return True
    if fault.kind == "examples":
        if "metrics" not in content.metric_records:
            return False
        content["metrics"]["num-examples"] = _count(fault.value)
        return True
    if fault.kind == "drop" or "arrays" not in content.array_records:
        return False
    weights = {key: array.numpy() for key, array in content["arrays"].items()}
    if fault.kind == "nan":
        corrupted = {key: np.full_like(w, np.nan) for key, w in weights.items() if w.dtype.kind == "f"}
    elif fault.kind == "scale":
        received = sent.content["arrays"]
        corrupted = {key: _scaled(received[key].numpy(), w, float(fault.value or 0.0))
                     for key, w in weights.items() if w.dtype.kind == "f"}
    else:  # random
        rng = np.random.default_rng([message_round(sent) or 0, partition])
        corrupted = {key: rng.standard_normal(w.shape).astype(w.dtype) for key, w in weights.items()
                     if w.dtype.kind == "f"}
    content["arrays"] = ArrayRecord({key: Array(corrupted.get(key, w)) for key, w in weights.items()})
    return True


def _scaled(received: np.ndarray, update: np.ndarray, factor: float) -> np.ndarray:
    """``received + factor * (update - received)`` in float64, cast to ``update``'s dtype (it may overflow)."""
    with np.errstate(over="ignore"):
        scaled = received.astype(np.float64) + factor * (update.astype(np.float64) - received.astype(np.float64))
        return scaled.astype(update.dtype)


def _count(value: float | None) -> int | float:
    """An ``examples:N`` count as the metric: an int when N is a whole number an int64 holds, else the float."""
    number = float(value if value is not None else 0.0)
    return int(number) if number.is_integer() and abs(number) < 2**63 else number
