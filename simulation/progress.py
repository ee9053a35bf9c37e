"""Following a running federation from its ``metrics.jsonl``: a line per finished round and the final tables.

Metric keys are those the ServerApp records (kebab-case: ``psnr``, ``baseline-psnr``, ``train-loss`` ...); each
evaluation row names its ``baseline``, the interpolation its ``baseline-*`` scores come from (``bicubic``,
``trilinear`` or ``cubic-1d``). Tables put the sites in rows, so they fit an 80-column terminal with full site
names however many sites there are; the per-round table leaves rounds out (never sites) when they do not fit.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: Metrics of the final table: (key, header, format). Each is shown for the model, its baseline and the change.
FINAL_METRICS = (("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("nrmse", "NRMSE", "{:.4f}"),
                 ("hfen", "HFEN", "{:.4f}"))
#: Spaces between two columns of the tables below (1 of padding and the 1-space rule).
COLUMN_GAP = 2


class MetricsFollower:
    """Reads new lines of ``metrics.jsonl`` as the ServerApp appends them and groups the rows of one ``experiment``
    (the run's main federated model: ``global``, or ``holdout:SITE``) by round; ``rows`` has every row."""

    def __init__(self, path: Path, experiment: str = "global") -> None:
        self.path = path
        self.experiment = experiment
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
            if row.get("experiment", "global") == self.experiment and row["phase"] in ("train", "evaluate"):
                self.rounds[row["round"]][row["phase"]][row["site"]] = row
        self.rows.extend(new)
        return new

    def finished_round(self, server_round: int, num_sites: int) -> bool:
        """Whether ``num_sites`` sites have reported their evaluation for ``server_round``."""
        return len(self.rounds[server_round]["evaluate"]) >= num_sites

    def baselines(self) -> dict[str, str]:
        """``{site: baseline method}`` from the sites' latest evaluation rows (sites that named none left out)."""
        return {row["site"]: row["baseline"] for row in self.rows if row["phase"] == "evaluate" and "baseline" in row}


def follower_rows(run_dir: Path, experiment: str = "global") -> MetricsFollower:
    """All of a run folder's ``metrics.jsonl``, read at once."""
    follower = MetricsFollower(run_dir / "metrics.jsonl", experiment)
    follower.poll()
    return follower


def round_line(server_round: int, phases: Mapping[str, Mapping[str, dict]]) -> str:
    """``round   3  loss 0.0123  PSNR dB (gain over bicubic): site-a 31.20 (+2.10)  site-b ...``: one finished
    round. A long line wraps at spaces in the terminal, so site names are never cut."""
    losses = [row["train-loss"] for row in phases["train"].values() if "train-loss" in row]
    parts = [f"round {server_round:>3}", f"loss {sum(losses) / len(losses):.4f}" if losses else "loss    -   "]
    evaluations = sorted(phases["evaluate"].items())
    methods = sorted({row.get("baseline", "baseline") for _, row in evaluations})
    if evaluations:
        parts.append(f"PSNR dB (gain over {'/'.join(methods)}):")
    for site, row in evaluations:
        parts.append(f"{site} {row['psnr']:.2f} ({row['psnr'] - row['baseline-psnr']:+.2f})")
    return "  ".join(parts)


def round_table(follower: MetricsFollower, width: int = 80) -> Table:
    """PSNR on each site's validation scans by round: one row per site, its baseline first, then the rounds;
    the last row is the mean train loss. Rounds are left out evenly (first and last kept) so that the table fits
    ``width`` columns."""
    sites = sorted({row["site"] for row in follower.rows if row["phase"] == "evaluate"})
    baselines = follower.baselines()
    loss_label = "mean train loss"
    label_width = max([len(loss_label), *map(len, sites)])
    base_psnr = {row["site"]: row["baseline-psnr"] for row in follower.rows
                 if row["phase"] == "evaluate" and "baseline-psnr" in row}  # the same every round
    base_cells = [_fmt(base_psnr.get(site)) for site in sites]
    base_header = _one_method(baselines, sites)
    columns: list[tuple[str, list[str]]] = []  # (header, one cell per site + the loss cell), one per round
    for server_round in sorted(follower.rounds):
        phases = follower.rounds[server_round]
        losses = [row["train-loss"] for row in phases["train"].values() if "train-loss" in row]
        loss = f"{sum(losses) / len(losses):.4f}" if losses else ""
        columns.append((f"r{server_round}", [_fmt(phases["evaluate"].get(s, {}).get("psnr")) for s in sites] + [loss]))
    fixed = label_width + COLUMN_GAP + _width(base_header, base_cells)
    shown = _fit(columns, width - fixed)
    table = _table("PSNR dB by round (validation scans)")
    if len(shown) < len(columns):
        table.caption = f"{len(columns) - len(shown)} of {len(columns)} rounds left out to fit; all are in metrics.jsonl"
    table.add_column("site", no_wrap=False, overflow="fold")
    table.add_column(escape(base_header), justify="right", no_wrap=True)
    for header, _cells in shown:
        table.add_column(header, justify="right", no_wrap=True)
    for i, site in enumerate(sites):
        table.add_row(escape(site), base_cells[i], *[cells[i] for _, cells in shown], end_section=i == len(sites) - 1)
    table.add_row(loss_label, "", *[cells[-1] for _, cells in shown])
    _note_methods(table, baselines, sites)
    return table


def summary_table(summary: Mapping, baselines: Mapping[str, str] | None = None) -> Table:
    """The final global model on each site's validation scans: per site a row of its scores, one of its baseline's
    (named by method) and one of the change; ``baselines`` names each site's method where ``summary`` does not."""
    baselines = dict(baselines or {})
    table = _table("Final global model, validation scans")
    table.add_column("site", no_wrap=False, overflow="fold")
    for _key, header, _fmt_spec in FINAL_METRICS:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("scans", justify="right", no_wrap=True)
    sites = list(summary["sites"])
    for i, site in enumerate(sites):
        m = summary["sites"][site]
        method = str(m.get("baseline") or baselines.get(site) or "baseline")
        model_row, base_row, change_row = [], [], []
        for key, _header, spec in FINAL_METRICS:
            value, base = m.get(key), m.get(f"baseline-{key}")
            model_row.append("" if value is None else spec.format(value))
            base_row.append("" if base is None else spec.format(base))
            change_row.append("" if value is None or base is None else spec.replace("{:", "{:+").format(value - base))
        scans = m.get("num-val-scans")
        table.add_row(escape(site), *model_row, "" if scans is None else str(int(scans)))
        table.add_row(f"  {escape(method)}", *base_row, "", style="dim")
        table.add_row("  change", *change_row, "", end_section=i < len(sites) - 1)
    return table


def cross_site_table(report: Mapping) -> Table:
    """Test PSNR (dB) of the run's models at each site, from ``report.json``: a row per site; columns the main
    federated model(s), the mean of the local-only models scored there, pooled and the interpolation, when the
    run has them. Leave-one-out models appear as one column: each site's own held-out model ("unseen")."""
    psnr = report["cross_site"].get("psnr", {})
    sites = list(report["sites"])
    columns: dict[str, list[float | None]] = {}
    for model in ("global", *(m for m in psnr if m.startswith("holdout:") and "global" not in psnr)):
        if model in psnr:
            columns[model] = [psnr[model].get(site, {}).get("mean") for site in sites]
    if "global" in psnr and any(m.startswith("holdout:") for m in psnr):
        columns["unseen"] = [psnr.get(f"holdout:{site}", {}).get(site, {}).get("mean") for site in sites]
    local = [[psnr[m][site]["mean"] for m in psnr if m.startswith("local:") and site in psnr[m]] for site in sites]
    if any(local):
        columns["local mean"] = [sum(v) / len(v) if v else None for v in local]
    for model in ("pooled", "interpolation"):
        if model in psnr:
            columns[model] = [psnr[model].get(site, {}).get("mean") for site in sites]
    table = _table("Test PSNR dB (report.html has every metric, interval and model)")
    table.add_column("site", no_wrap=False, overflow="fold")
    for header in columns:
        table.add_column(escape(header), justify="right", no_wrap=True, overflow="fold")
    for i, site in enumerate(sites):
        table.add_row(escape(site), *[_fmt(values[i]) for values in columns.values()])
    return table


def print_run_end(console: Console, run_dir: Path, experiment: str, summary: Mapping) -> None:
    """What a finished run ends with on the terminal (``fedsr simulate`` and ``fedsr deploy local``): the rounds of
    ``experiment``, its last validation scores, the cross-site test table, and where the report is."""
    follower = follower_rows(run_dir, experiment)
    console.print(round_table(follower, width=console.width))
    console.print(summary_table(summary, follower.baselines()))
    for site, last in summary.get("missing_sites", {}).items():
        seen = f"last scored in round {last}" if last is not None else "never scored"
        console.print(f"[yellow]site {escape(site)} was missing at the end ({seen}); see flower.log or the "
                      "coordinator's log[/]", highlight=False)
    if (run_dir / "report.json").exists():
        console.print(cross_site_table(json.loads((run_dir / "report.json").read_text())))
    for name in ("report.html", "report.json"):
        if (run_dir / name).exists():
            console.print(f"{name}: {run_dir / name}", markup=False, highlight=False)


def _table(title: str) -> Table:
    """A table that spends :data:`COLUMN_GAP` characters between columns and none at the edges."""
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))


def _width(header: str, cells: list[str]) -> int:
    return max([len(header), *map(len, cells)])


def _fit(columns: list[tuple[str, list[str]]], room: int) -> list[tuple[str, list[str]]]:
    """The most columns, evenly spread and keeping the first and the last, whose widths fit in ``room``."""
    widths = [COLUMN_GAP + _width(header, cells) for header, cells in columns]
    for count in range(len(columns), 1, -1):
        picks = sorted({round(i * (len(columns) - 1) / (count - 1)) for i in range(count)})
        if sum(widths[p] for p in picks) <= room:
            return [columns[p] for p in picks]
    return columns[-1:]


def _one_method(baselines: Mapping[str, str], sites: list[str]) -> str:
    """The baseline column's header: the method when every site uses the same one."""
    methods = {baselines.get(site, "baseline") for site in sites}
    return methods.pop() if len(methods) == 1 else "baseline"


def _note_methods(table: Table, baselines: Mapping[str, str], sites: list[str]) -> None:
    if len({baselines.get(site, "baseline") for site in sites}) > 1:
        note = "baseline per site: " + ", ".join(f"{s} {baselines.get(s, '?')}" for s in sites)
        table.caption = escape(f"{table.caption}; {note}" if table.caption else note)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"
