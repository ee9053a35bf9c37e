"""The sites as the coordinator knows them: who they are, and which of them a part of the run may message.

At the start of a run every site describes itself once (``query.describe``): its display name and what the report
shows of it (modality, scanner, acquisition profile, scans and patients per split, what it consents to share). No
scan, path or patient id is in it. Each part of a run (the federation, a federation without one held-out site, the
baselines, the cross-site evaluation) then talks to the sites through a :class:`SiteGrid`, which shows Flower's
strategies only the sites of that part and appends every message it sends to ``RUN_DIR/messages.jsonl``: the
audit trail of what the coordinator asked of which site.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

DESCRIBE = "query.describe"
#: Seconds between the coordinator's asks for the replies it waits for (a cheap request to the SuperLink).
REPLY_POLL_SECONDS = 0.2


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites, no usable update); the message says what to do."""


@dataclass(frozen=True)
class SiteInfo:
    """One connected site: its node id, its display name and what it said of itself (``about``: JSON-able)."""

    node_id: int
    name: str
    about: Mapping[str, Any]


def site_about(msg: Message) -> dict:
    """What a site said of itself in its reply (``name``, ``baseline``, ``normalisation``); empty for error replies."""
    if msg.has_content() and "site" in msg.content.config_records:
        return dict(msg.content.config_records["site"])
    return {}


def site_name(msg: Message) -> str:
    """The display name a site put in its reply, or its node id when it sent none (error replies)."""
    return str(site_about(msg).get("name", f"node-{msg.metadata.src_node_id}"))


class GridView(Grid):
    """A grid that passes everything on to the ``grid`` it wraps; a subclass narrows what Flower's strategies
    sample among (``get_node_ids``) or adds to how messages go out."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    @property
    def run(self):  # type: ignore[override]
        return self._grid.run

    def set_run(self, run) -> None:  # type: ignore[override]
        self._grid.set_run(run)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        return list(self._grid.get_node_ids())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class SiteGrid(GridView):
    """A view of Flower's grid for one part of a run: only ``sites`` are visible, every message sent is logged.

    Flower's strategies sample among ``get_node_ids()``, so a federation run through a view of the other sites
    sends a held-out site nothing. Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Grid, sites: Iterable[SiteInfo], part: str, log_path: Path) -> None:
        super().__init__(grid)
        self.sites = {site.node_id: site for site in sites}
        self.part = part
        self._log_path = log_path

    def named(self, part: str, sites: Iterable[SiteInfo] | None = None) -> SiteGrid:
        """Another view of the same grid, for ``part`` (default: the same sites)."""
        return SiteGrid(self._grid, self.sites.values() if sites is None else sites, part, self._log_path)

    def without(self, name: str, part: str) -> SiteGrid:
        """The view without the site called ``name``."""
        return self.named(part, [site for site in self.sites.values() if site.name != name])

    def site_of(self, reply: Message) -> str:
        """The display name of the site ``reply`` comes from: the grid's name for the node that sent it (an error
        reply says nothing of its site), else the name in the reply (:func:`site_name`)."""
        node = reply.metadata.src_node_id
        return self.sites[node].name if node in self.sites else site_name(reply)

    def by_name(self, name: str) -> SiteInfo:
        for site in self.sites.values():
            if site.name == name:
                return site
        raise KeyError(name)

    # --------------------------------------------------------------------------------------- Grid interface
    def get_node_ids(self) -> list[int]:
        connected = set(self._grid.get_node_ids())
        return [node for node in self.sites if node in connected]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._record(messages)
        return self._grid.push_messages(messages)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all are in or ``timeout`` seconds have passed (None:
        no limit), as Flower's grids do, but asking every :data:`REPLY_POLL_SECONDS`: Flower 1.42's deployment
        grid waits 3 s between asks, which cost up to 3 s per exchange, two exchanges a round."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self._grid.pull_messages(pending))
            replies += arrived
            pending -= {msg.metadata.reply_to_message_id for msg in arrived}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(REPLY_POLL_SECONDS)
        return replies

    def _record(self, messages: list[Message]) -> None:
        """Append one line per message: when, which part of the run, its type and the site it goes to."""
        lines = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            site = self.sites[node].name if node in self.sites else f"node-{node}"
            lines.append(json.dumps({"time": round(time.time(), 3), "part": self.part,
                                     "type": msg.metadata.message_type, "site": site, "node": node}))
        with self._log_path.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())


def describe_sites(grid: Grid, node_ids: list[int], config: ConfigRecord, timeout: float, log_path: Path) -> SiteGrid:
    """Ask every site to load its data and describe itself; returns the view of every site that could.

    A site that fails (unreadable data, a bad site.toml) is left out with its error logged; two sites with one
    name are an error (the report and the run record tell sites apart by name).
    """
    everyone = SiteGrid(grid, [SiteInfo(node, f"node-{node}", {}) for node in node_ids], "describe", log_path)
    messages = [
        everyone.create_message(RecordDict({"config": config}), DESCRIBE, node, group_id="describe")
        for node in node_ids
    ]
    sites, seen = [], {}
    for reply in everyone.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.error("site at node %d could not describe itself and takes no part in this run: %s", node,
                      reply.error.reason)  # the site's category and reason; the detail stays in its own log
            continue
        about = site_about(reply)
        name = str(about["name"])
        if name in seen:
            raise FederationError(
                f"two sites call themselves {name!r} (nodes {seen[name]} and {node}): give each a distinct name in "
                "its site.toml"
            )
        seen[name] = node
        sites.append(SiteInfo(node, name, json.loads(str(about["about"]))))
    sites.sort(key=lambda site: site.name)
    return SiteGrid(grid, sites, "run", log_path)
