"""Following a running federation from its ``metrics.jsonl``: a progress bar and a per-round table."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.table import Table


class MetricsFollower:
    """Reads new lines of ``metrics.jsonl`` as the ServerApp appends them and groups them by round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rows: list[dict] = []
        self.rounds: dict[int, dict[str, dict[str, dict]]] = defaultdict(lambda: {"train": {}, "evaluate": {}})

    def poll(self) -> list[dict]:
        """New complete rows since the last call (a partly written last line is left for next time)."""
        if not self.path.exists():
            return []
        with self.path.open("r", encoding="utf-8") as handle:
            handle.seek(self.offset)
            text = handle.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode("utf-8"))
        new = [json.loads(line) for line in complete.splitlines() if line.strip()]
        for row in new:
            self.rounds[row["round"]][row["phase"]][row["site"]] = row
        self.rows.extend(new)
        return new

    def finished_round(self, server_round: int, num_sites: int) -> bool:
        """Whether every site has reported its evaluation for ``server_round``."""
        return len(self.rounds[server_round]["evaluate"]) >= num_sites


def follower_rows(run_dir: Path) -> MetricsFollower:
    """All of a run folder's ``metrics.jsonl``, read at once."""
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    follower.poll()
    return follower


def round_line(server_round: int, phases: dict[str, dict[str, dict]]) -> str:
    """``round 3  loss 0.0123  site-a 31.20 dB (+2.10)  site-b ...``: one finished round, one line."""
    losses = [row["train-loss"] for row in phases["train"].values()]
    parts = [f"round {server_round:>3}", f"loss {sum(losses) / len(losses):.4f}" if losses else "loss    -   "]
    for site, row in sorted(phases["evaluate"].items()):
        parts.append(f"{site} {row['psnr']:.2f} dB ({row['psnr'] - row['bicubic_psnr']:+.2f})")
    return "  ".join(parts)


def round_table(follower: MetricsFollower) -> Table:
    """Round | mean train loss | PSNR per site, with the bicubic PSNR as the first row for reference."""
    sites = sorted({row["site"] for row in follower.rows if row["phase"] == "evaluate"})
    table = Table(title="Rounds (PSNR in dB on each site's validation scans)")
    table.add_column("round", justify="right")
    table.add_column("train loss", justify="right")
    for site in sites:
        table.add_column(site, justify="right")
    first = next((r for r in sorted(follower.rounds) if follower.rounds[r]["evaluate"]), None)
    if first is not None:
        evals = follower.rounds[first]["evaluate"]
        table.add_row("bicubic", "", *[_fmt(evals.get(s, {}).get("bicubic_psnr")) for s in sites])
    for server_round in sorted(follower.rounds):
        phases = follower.rounds[server_round]
        losses = [row["train-loss"] for row in phases["train"].values()]
        loss = f"{sum(losses) / len(losses):.4f}" if losses else ""
        table.add_row(str(server_round), loss, *[_fmt(phases["evaluate"].get(s, {}).get("psnr")) for s in sites])
    return table


def summary_table(summary: dict) -> Table:
    """Final per-site numbers of the global model beside the bicubic baseline."""
    table = Table(title="Final global model, validation scans")
    for column in ("site", "PSNR", "bicubic", "gain dB", "SSIM", "bicubic SSIM", "NRMSE", "HFEN", "val scans"):
        table.add_column(column, justify="right")
    for site, m in summary["sites"].items():
        table.add_row(
            site, _fmt(m["psnr"]), _fmt(m["bicubic_psnr"]), f"{m['psnr'] - m['bicubic_psnr']:+.2f}",
            f"{m['ssim']:.4f}", f"{m['bicubic_ssim']:.4f}", f"{m['nrmse']:.4f}", f"{m['hfen']:.4f}",
            str(int(m["num_val_scans"])),
        )
    return table


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"
