"""``fedsr privacy show|reset SITE_DIR``: a hospital reads and (with a reason) resets its privacy ledger."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.data.errors import SiteError
from client.data.siteconfig import SiteConfig, load_site_config
from client.privacy_ledger import LedgerError, PrivacyLedger
from client.state import DEFAULT_STATE_DIR_NAME


def _open(console: Console, site_dir: Path, state_dir: Path | None) -> tuple[SiteConfig, PrivacyLedger] | None:
    """The site's settings and ledger (read only: nothing is created), or None after printing why not."""
    try:
        config = load_site_config(site_dir)
        ledger = PrivacyLedger.open(state_dir or site_dir / DEFAULT_STATE_DIR_NAME)
    except (SiteError, LedgerError) as error:
        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return None
    return config, ledger


def show_ledger(console: Console, site_dir: Path, state_dir: Path | None) -> int:
    """Print the spent epsilon per unit, the budget and the history; exit code 0 (2: unreadable)."""
    opened = _open(console, site_dir, state_dir)
    if opened is None:
        return 2
    config, ledger = opened
    privacy = config.privacy
    budget = "none" if privacy.epsilon_budget is None else f"{privacy.epsilon_budget:g}"
    console.print(f"site {escape(config.name)}: ledger {escape(str(ledger.path))}")
    console.print(f"delta {privacy.delta:g}, budget epsilon {budget} per unit, DP required: "
                  f"{'yes' if privacy.dp_required else 'no'}")
    units = sorted({spend.unit for spend in ledger.spends()})
    if not units:
        console.print("nothing spent: no DP training of this site's data has left it")
    summary = Table("unit", "epsilon spent", "steps", "spends", title="Since the last reset")
    for unit in units:
        mechanisms = ledger.mechanisms(unit)
        summary.add_row(unit, f"{ledger.epsilon(unit, privacy.delta):.4f}", str(sum(m.steps for m in mechanisms)),
                        str(len(mechanisms)))
    if units:
        console.print(summary)
    history = Table("time", "entry", "run", "round", "purpose", "unit", "sigma", "q", "steps", "epsilon after",
                    title="History (oldest first)")
    for entry in ledger.entries:
        if entry["kind"] == "reset":
            forgotten = ", ".join(f"{unit} {eps:.3f}" for unit, eps in entry["epsilon_before"].items())
            history.add_row(entry["time"], "reset", "", "", escape(entry["reason"]), "", "", "", "",
                            f"forgot {forgotten or 'nothing'}")
            continue
        mechanism = entry["mechanism"]
        history.add_row(entry["time"], "spend", entry["run"], str(entry["round"]), entry["purpose"] or "federated",
                        entry["unit"], f"{mechanism['noise_multiplier']:.3f}", f"{mechanism['sample_rate']:.3f}",
                        str(mechanism["steps"]), f"{entry['epsilon']:.4f}")
    if ledger.entries:
        console.print(history)
    return 0


def reset_ledger(console: Console, site_dir: Path, state_dir: Path | None, reason: str, *, confirmed: bool) -> int:
    """Append a reset with ``reason`` (only with ``confirmed``); exit code 0, 2 when refused or unreadable."""
    opened = _open(console, site_dir, state_dir)
    if opened is None:
        return 2
    config, ledger = opened
    if not confirmed:
        console.print("[red]not reset:[/] add --yes. A reset forgets the epsilon spent on this site's patients; do "
                      "it only for data none of whose patients were trained on under the current ledger.")
        return 2
    try:
        forgotten = ledger.reset(reason, config.privacy.delta)
    except ValueError as error:
        console.print(f"[red]not reset:[/] {escape(str(error))}")
        return 2
    spent = ", ".join(f"{unit} {eps:.4f}" for unit, eps in forgotten.items()) or "nothing"
    console.print(f"reset: forgot epsilon {spent}; reason kept in {escape(str(ledger.path))}")
    return 0
