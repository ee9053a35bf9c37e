"""A site's privacy ledger: every DP training whose weights left the site, kept across rounds and runs.

The ledger is ``STATE/privacy-ledger.json`` in the site's state folder (:func:`client.state.site_state_dir`),
rewritten atomically (a reader sees the old ledger or the new one). It holds, in order:

- ``spend`` entries: one per training whose weights left the site (a federated round, a shared local-only model):
  when, which run and round, the privacy unit, and the DP-SGD mechanism it ran (noise multiplier sigma, the
  units' sampling rate q, the number of steps), with the unit's epsilon after it;
- ``reset`` entries: written by ``fedsr privacy reset``, with the operator's reason and the epsilons forgotten.

Epsilon is recomputed from the mechanisms since the last reset with Opacus' RDP accountant at the site's delta
(RDP composes over any history and converts to (epsilon, delta) at the end), per privacy unit: a patient-level and
a patch-level guarantee do not add up to either. The ledger never forgets a spend on its own.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared_models.atomic import atomic_write
from shared_models.errors import ExplainedError
from shared_models.privacy_accounting import Mechanism, epsilon_of

LEDGER_NAME = "privacy-ledger.json"
#: The format this module writes; a ledger of another version is refused rather than misread.
LEDGER_VERSION = 1


class LedgerError(ExplainedError, RuntimeError):
    """A ledger file that cannot be read; never replaced silently (that would forget spent privacy)."""


@dataclass(frozen=True)
class Spend:
    """One training whose weights left the site. ``time``: ISO 8601 UTC; ``purpose``: "" for a federated round,
    else the baseline's name; ``epsilon``: the unit's total since the last reset, after this spend."""

    time: str
    run: str
    round: int
    purpose: str
    unit: str
    mechanism: Mechanism
    epsilon: float


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class PrivacyLedger:
    """The ledger file of one site's state folder (``ledger.entries``: plain dicts, oldest first)."""

    def __init__(self, path: Path, entries: list[dict[str, Any]]) -> None:
        self.path = path
        self.entries = entries

    @classmethod
    def open(cls, state_dir: Path) -> PrivacyLedger:
        """The ledger in ``state_dir`` (empty when there is none yet). Raises LedgerError for an unreadable one."""
        path = Path(state_dir) / LEDGER_NAME
        if not path.exists():
            return cls(path, [])
        try:
            data = json.loads(path.read_text("utf-8"))
            if data.get("version") != LEDGER_VERSION or not isinstance(data.get("entries"), list):
                raise ValueError(f"not a version-{LEDGER_VERSION} ledger")
        except (ValueError, OSError) as error:
            raise LedgerError(path, f"cannot be read ({error})",
                              "restore it from the site's backup; fedsr will not train under DP without it, since "
                              "the privacy it records as spent would be forgotten") from error
        return cls(path, data["entries"])

    def mechanisms(self, unit: str) -> list[Mechanism]:
        """The DP-SGD mechanisms spent on ``unit`` since the last reset, oldest first."""
        spent: list[Mechanism] = []
        for entry in self.entries:
            if entry["kind"] == "reset":
                spent = []
            elif entry["unit"] == unit:
                spent.append(Mechanism(**entry["mechanism"]))
        return spent

    def epsilon(self, unit: str, delta: float, *, adding: Mechanism | None = None) -> float:
        """Epsilon spent on ``unit`` at ``delta`` since the last reset (``adding``: were this spent too)."""
        return epsilon_of([*self.mechanisms(unit), *([adding] if adding else [])], delta)

    def spends(self) -> list[Spend]:
        """Every spend entry, resets included in between (see :attr:`entries`), as :class:`Spend`."""
        return [Spend(**{**{k: v for k, v in e.items() if k != "kind"}, "mechanism": Mechanism(**e["mechanism"])})
                for e in self.entries if e["kind"] == "spend"]

    def record(self, *, run: str, round_: int, purpose: str, unit: str, mechanism: Mechanism, delta: float) -> Spend:
        """Append a spend and write the ledger (atomically) before the weights it covers leave the site."""
        spend = Spend(now(), run, round_, purpose, unit, mechanism,
                      self.epsilon(unit, delta, adding=mechanism))
        self._write([*self.entries, {"kind": "spend", **asdict(spend)}])
        return spend

    def reset(self, reason: str, delta: float) -> dict[str, float]:
        """Start counting from zero, keeping the history and the reason; returns the epsilons forgotten per unit."""
        if not reason.strip():
            raise ValueError("a reset needs a reason (it is kept in the ledger)")
        units = sorted({e["unit"] for e in self.entries if e["kind"] == "spend"})
        forgotten = {unit: self.epsilon(unit, delta) for unit in units}
        self._write([*self.entries, {"kind": "reset", "time": now(), "reason": reason, "epsilon_before": forgotten,
                                     "delta": delta}])
        return forgotten

    def _write(self, entries: list[dict[str, Any]]) -> None:
        text = json.dumps({"version": LEDGER_VERSION, "entries": entries}, indent=1)
        atomic_write(self.path, lambda handle: handle.write(text.encode("utf-8")))
        self.entries = entries
