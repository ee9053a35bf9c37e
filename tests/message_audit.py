"""An audit of everything the sites send during a run: weights, numbers, names, and nothing identifying.

The replies are recorded where they arrive, at the coordinator's grid, so the audit sees each one exactly as it left
its site, after every client mod (errors worded by ``client.safe_errors``, refusals by ``client.policy``); a
recorder inside the ClientApp (a mod in ``build_client_app(mods=...)``) would sit inside both and see neither. API::

    from message_audit import audit, recording_server_app, travelling_arrays   # tests/ is on sys.path

    server_app, replies = recording_server_app(settings)        # run_federation, its grid's replies recorded
    run_simulation(server_app=server_app, client_app=build_client_app(folders), ...)
    assert audit(replies, travelling_arrays(settings), forbidden=[str(folder), "DOE_JOHN_12345", ...]) == []

:func:`audit` returns one line per problem (empty: the run sent only what ARCHITECTURE.md's "What leaves a site"
allows). A new kind of reply (a refusal of another category, a new record) is one more case in :func:`_problems_of`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid, ServerApp

from client.safe_errors import CATEGORIES, DETAIL
from server.app import run_federation
from server.settings import RunSettings
from shared_models.registry import build_from_settings, family

#: Shape and dtype of each travelling weight, by key.
ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]

#: The keys of the ``site`` record: what a site says of itself (``about`` only in the describe reply).
SITE_KEYS = {"name", "baseline", "normalisation", "about"}
#: Longest string a site's description (``about``) or intensity rule (``normalisation``) may hold.
SHORT = 120
#: Keys of the example crops a consenting site sends with its cross-site scores (plus ``sr:MODEL``).
PREVIEW_KEYS = {"lr", "interpolation", "hr"}
#: Largest side of an example crop (client.evaluation.crop_preview's default size).
PREVIEW_SIDE = 64
#: An error reply's reason: a category, its fixed sentence, and for fedsr's own input errors a scrubbed detail.
ERROR_REASON = re.compile(
    "(?:" + "|".join(f"{re.escape(category)}: {re.escape(sentence)}" for category, sentence in CATEGORIES.items())
    + f")(?:{re.escape(DETAIL)}[^/\\\\]*)?"
)
#: Refusal categories (client.policy, client.privacy) and the keys of a refusal record.
REFUSAL_CATEGORIES = {"policy", "privacy-budget", "privacy-required"}
REFUSAL_KEYS = {"category", "reason"}


class RecordingGrid:
    """The grid the ServerApp is given, with every reply pulled through it appended to ``replies``."""

    def __init__(self, grid: Grid, replies: list[Message]) -> None:
        self._grid = grid
        self.replies = replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        arrived = list(self._grid.pull_messages(message_ids))
        self.replies.extend(arrived)
        return arrived

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        arrived = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(arrived)
        return arrived


def recording_server_app(settings: RunSettings) -> tuple[ServerApp, list[Message]]:
    """fedsr's ServerApp for ``settings`` (``server.app.run_federation``) and the list it fills with every reply."""
    replies: list[Message] = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(RecordingGrid(grid, replies), settings)  # type: ignore[arg-type]  # a Grid by delegation

    return app, replies


def run_recorded(settings: RunSettings, site_dirs: Sequence[str | Path], mods: Sequence[Mod] = ()) -> list[Message]:
    """One federation of ``settings`` on Flower's simulation engine, a simulated site per folder of ``site_dirs``
    (the ClientApp with ``mods``), one core per site; returns every reply the coordinator pulled."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app

    server_app, replies = recording_server_app(settings)
    run_simulation(
        server_app=server_app,
        client_app=build_client_app([str(folder) for folder in site_dirs], mods=mods),
        num_supernodes=len(site_dirs),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    return replies


def travelling_arrays(settings: RunSettings) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype) of the weights that travel in a run with ``settings``, from the model built the way
    the coordinator and every site build it and its family's ``shared_state``."""
    model = build_from_settings(settings)
    state = family(settings.model).shared_state(model, settings.family_options)
    return {key: (tuple(tensor.shape), str(tensor.numpy().dtype)) for key, tensor in state.items()}


def audit(replies: Sequence[Message], arrays: ArraySpec, forbidden: Iterable[str]) -> list[str]:
    """Every problem with what the sites sent, one line each (empty when there is none).

    ``arrays``: the travelling weights (:func:`travelling_arrays`). ``forbidden``: strings no reply may contain
    anywhere (site folder paths, scan file names, patient ids). Consent is what each site said in its describe
    reply (``about``: ``shares_local_model``, ``shares_previews``); a site that never described itself consents
    to nothing. Replies the SuperLink makes (from node 0: a site gone, a message expired) are no site's and are
    left out.
    """
    consent: dict[int, dict[str, Any]] = {}
    for reply in replies:
        if reply.metadata.message_type == "query.describe" and not reply.has_error():
            consent[reply.metadata.src_node_id] = json.loads(str(reply.content.config_records["site"]["about"]))
    forbidden = [text for text in forbidden if text]
    problems = []
    for reply in replies:
        if reply.metadata.src_node_id == 0:
            continue
        where = f"node {reply.metadata.src_node_id} {reply.metadata.message_type}"
        about = consent.get(reply.metadata.src_node_id, {})
        problems += [f"{where}: {problem}" for problem in _problems_of(reply, arrays, about)]
        problems += [f"{where}: sends {text!r} in {string!r}" for string in _strings(reply) for text in forbidden
                     if text in string]
    return problems


def _problems_of(reply: Message, arrays: ArraySpec, about: Mapping[str, Any]) -> Iterator[str]:
    """What is wrong with one reply: its records, by the message type it answers."""
    if reply.has_error():
        if not ERROR_REASON.fullmatch(reply.error.reason):
            yield f"error reason not in the category format: {reply.error.reason!r}"
        return
    content = reply.content
    kind = reply.metadata.message_type
    if "refusal" in content.config_records:
        yield from _refusal_problems(reply)
        return
    expected = {"site"} | {
        "train": {"arrays", "metrics"}, "train.pooled": {"arrays", "metrics"}, "evaluate": {"metrics"},
        "query.describe": set(), "train.local": {"metrics"} | ({"arrays"} if about.get("shares_local_model") else set()),
    }.get(kind, set())
    if kind == "evaluate.cross":
        cross = {key for key in content.metric_records if key.startswith("scores:")}
        expected |= cross | ({"previews"} if about.get("shares_previews") else set()) | {"membership"}
    if set(content.keys()) - expected:
        yield f"records {sorted(set(content.keys()) - expected)} not expected in a {kind} reply"
    if kind == "train.local" and about.get("shares_local_model") and "arrays" not in content.array_records:
        yield "a site that shares its local model sent no weights"
    for key, record in content.array_records.items():
        if key == "previews":
            yield from _preview_problems(record)
        elif key == "arrays":
            got = {name: (tuple(array.shape), array.dtype) for name, array in record.items()}
            if got != dict(arrays):
                yield f"weights {got} are not the travelling weights {dict(arrays)}"
    for key, record in content.metric_records.items():
        lists = key.startswith("scores:")
        for name, value in record.items():
            if not _metric_ok(value, lists):
                yield f"metric {key}/{name} is {type(value).__name__} {value!r}: only numbers (lists in scores)"
    for key, record in content.config_records.items():
        if key == "site":
            yield from _site_problems(dict(record), kind)
        else:
            yield f"config record {key!r} is not expected"


def _site_problems(said: Mapping[str, Any], kind: str) -> Iterator[str]:
    allowed = SITE_KEYS if kind == "query.describe" else SITE_KEYS - {"about"}
    if set(said) - allowed or "name" not in said:
        yield f"the site record has keys {sorted(said)}: name and only {sorted(allowed)}"
    if kind == "query.describe" and "about" not in said:
        yield "the describe reply has no description"
    for key in ("about", "normalisation"):
        if key in said:
            yield from (f"{key} holds {value!r}: only numbers and short strings"
                        for value in _leaves(json.loads(str(said[key]))) if not _plain(value))


def _refusal_problems(reply: Message) -> Iterator[str]:
    content = reply.content
    if set(content.keys()) != {"refusal", "site"} or set(content.config_records["site"]) != {"name"}:
        yield f"a refusal carries records {sorted(content.keys())}: only refusal and the site's name"
    refusal = dict(content.config_records["refusal"])
    if set(refusal) != REFUSAL_KEYS or refusal.get("category") not in REFUSAL_CATEGORIES:
        yield f"refusal record {refusal!r}: {sorted(REFUSAL_KEYS)}, category one of {sorted(REFUSAL_CATEGORIES)}"


def _preview_problems(record: Any) -> Iterator[str]:
    for name, array in record.items():
        if name not in PREVIEW_KEYS and not name.startswith("sr:"):
            yield f"preview {name!r} is not an example crop"
        if len(array.shape) != 2 or max(array.shape) > PREVIEW_SIDE or array.dtype != "float32":
            yield f"preview {name!r} is {array.dtype} {tuple(array.shape)}: 2D float32 crops of at most {PREVIEW_SIDE}"


def _metric_ok(value: Any, lists: bool) -> bool:
    numbers = (int, float)
    if lists:
        return isinstance(value, list) and all(isinstance(item, float) for item in value)
    return isinstance(value, numbers) and not isinstance(value, bool)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= SHORT)


def _leaves(value: Any) -> Iterator[Any]:
    """Every value under ``value`` that is not a dict or a list."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _strings(reply: Message) -> Iterator[str]:
    """Every string in a reply: its error reason, record and entry names, config values (JSON decoded)."""
    if reply.has_error():
        yield reply.error.reason
        return
    for key, record in reply.content.items():
        yield key
        for name, value in record.items():
            yield name
            if isinstance(value, str):
                yield value
                yield from (leaf for leaf in _leaves(_json_or_none(value)) if isinstance(leaf, str))


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
