"""One-axis (SMORE-style) SR: thick-slice sites learn from their own in-plane resolution, thin-slice sites from
through-plane pairs, and both train the same network, so they can be federated together.

The supervised task with one step changed: the pairs (:class:`client.selfsup.AxisPairing`). The site's
``supervision`` (``site.toml``) picks its data: ``"paired"`` (default) or ``"self"``.
"""

from __future__ import annotations

from client.pairs import Pairing
from client.selfsup import AxisPairing
from client.tasks.base import RoundJob
from client.tasks.supervised import SupervisedTask


class SmoreTask(SupervisedTask):
    """Self-supervised (thick-slice sites) or paired (thin-slice sites) one-axis SR with one shared network."""

    def pairing(self, job: RoundJob) -> Pairing:
        return AxisPairing()
