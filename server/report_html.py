"""``RUN_DIR/report.html``: report.json as one self-contained page people read, print and copy numbers from.

No external CSS, script, font or image: the figures (:mod:`server.report_plots`) are PNGs embedded as base64
``data:`` URIs, and every number a figure shows is also in an HTML table. Every string from the run (site names,
scanners, notes: they come from hospitals' ``site.toml``) is HTML-escaped.

Sections, in order: header and notes, refusals (when a site refused a request), rejected updates (when the
coordinator did not use a site's reply), privacy (the epsilon a DP run
spent; the membership-inference check of the global model), cross-site heatmaps (one per
metric), gain over interpolation, validation curves per round, leave-one-out (when the run has holdout models), data
consistency, example crops (sites that share previews only), sites.
"""

from __future__ import annotations

import base64
import struct
import zipfile
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from server import report_plots as plots
from server.report import ReportInputError
from server.run_log import atomic_write_text

#: Metrics with their own section (data consistency) rather than a cross-site heatmap.
CONSISTENCY = ("dc-error", "hf-excess")
#: Metrics whose model-minus-interpolation difference the heatmaps centre on 0.
GAINS = ("psnr-gain", "ssim-gain")
#: Width (CSS pixels) an example crop is enlarged towards, by a whole factor (crops wider than it stay 1:1).
CROP_PIXELS = 112
#: Metrics the leave-one-out table lists per site.
LEAVE_ONE_OUT_METRICS = ("psnr", "ssim", "nrmse", "hfen")

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0 auto;
  max-width:1500px;padding:0 24px 48px}
h1{font-size:24px;margin:24px 0 4px}h2{font-size:19px;margin:36px 0 8px;border-bottom:1px solid #ccc;
  padding-bottom:4px}h3{font-size:15px;margin:20px 0 6px}
dl.run{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:8px 0}dl.run dt{font-weight:600}
dl.run dd{margin:0}
nav{font-size:13px;margin:8px 0}nav a{margin-right:14px}
figure{margin:10px 0 18px}figure .plot{overflow-x:auto}figure img{display:block;max-width:none}
figcaption{font-size:13px;color:#444;margin-top:4px;max-width:1000px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 8px;
  text-align:left;vertical-align:top}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
thead th{background:#f0f0f3}td:first-child{white-space:nowrap}tbody tr:nth-child(even){background:#fafafa}
.missing{color:#888;font-style:italic}.wrap{overflow-x:auto}
details{margin:4px 0 16px}summary{cursor:pointer;color:#235}
p.note{color:#444}
p.warning{color:#8a1c00;font-weight:600}
table.crops td{vertical-align:top;padding:2px}table.crops th{vertical-align:middle;white-space:nowrap}
img.tile{image-rendering:pixelated;display:block}.sub{font-size:11px;color:#555;margin-top:4px}
.scale{font-size:12px;margin:2px 0 16px}.scale .bar{display:inline-block;width:160px;height:10px;
  vertical-align:middle;border:1px solid #999}
"""


def write_report_html(report: Mapping[str, Any], run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) from ``report`` (report.json's dict) and return its path.

    Preview crops are read from ``run_dir/<report["previews"][SITE]["file"]>``.
    """
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, render_report_html(report, Path(run_dir)))
    return path


def render_report_html(report: Mapping[str, Any], run_dir: Path) -> str:
    """The whole page as a string (see the module docstring for its sections)."""
    sites = list(report["sites"])
    models = list(report["models"])
    sections = [
        _header(report, run_dir, sites),
        _refusals(report),
        _rejections(report),
        _privacy(report),
        _model_options(report),
        _cross_site(report, models, sites),
        _gains(report, models, sites),
        _rounds(report, sites),
        _leave_one_out(report),
        _consistency(report, models, sites),
        _previews(report, run_dir, sites),
        _sites_table(report, sites),
    ]
    title = escape(f"fedsr report: {_run_name(report, run_dir)}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(s for s in sections if s) + "\n</body></html>\n")


# ---------------------------------------------------------------- building blocks


def _image(png: bytes, alt: str, shown_width: int | None = None) -> str:
    """``<img>`` with the PNG inline, its pixel size (read from the PNG header) as width and height.

    ``shown_width``: draw it that many CSS pixels wide instead, enlarged pixel by pixel (a crop tile).
    """
    width, height = struct.unpack(">II", png[16:24])
    data = base64.b64encode(png).decode("ascii")
    tile = f' class="tile" style="width:{shown_width}px;height:auto"' if shown_width else ""
    return f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}"{tile} alt="{escape(alt)}">'


def _figure(png: bytes, alt: str, caption: str) -> str:
    """A figure: the image (scrolls sideways when wider than the page) and its escaped caption."""
    return f'<figure><div class="plot">{_image(png, alt)}</div><figcaption>{escape(caption)}</figcaption></figure>'


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], text_columns: Collection[int] = (0,)) -> str:
    """An HTML table of already-escaped cells; the columns not in ``text_columns`` hold numbers (right-aligned,
    not wrapped)."""
    header = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" if i in text_columns else f'<td class="num">{c}</td>'
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f'<div class="wrap"><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>'


def _cell(cell: Mapping[str, Any] | None, digits: int) -> str:
    """``mean [lo, hi]`` (escaped HTML, its note as a tooltip), or why there is no interval; ``–`` for a cell that
    does not exist."""
    if cell is None:
        return '<span class="missing">–</span>'
    text = escape(plots.cell_text(cell, digits))
    return f'<span title="{escape(cell["note"])}">{text}</span>' if cell.get("note") else text


def _digits(report: Mapping[str, Any], metric: str) -> int:
    """Decimals of every number of ``metric`` in the report (4 significant digits of its largest cross-site mean)."""
    by_model = report["cross_site"].get(metric, {})
    return plots.decimals(c["mean"] for by_site in by_model.values() for c in by_site.values())


def _metric_title(report: Mapping[str, Any], metric: str, short: bool = False) -> str:
    """``PSNR (dB), higher is better``; ``short``: ``PSNR (dB) ↑`` (a table header)."""
    about = report["metrics"].get(metric, {})
    unit = f" ({about['unit']})" if about.get("unit") else ""
    higher = about.get("higher_is_better", True)
    if short:
        return f"{about.get('label', metric)}{unit} {'↑' if higher else '↓'}"
    return f"{about.get('label', metric)}{unit}, {'higher' if higher else 'lower'} is better"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def _present_models(cells: Mapping[str, Mapping[str, Any]], models: Sequence[str]) -> list[str]:
    """``models`` that have at least one cell, in report order."""
    return [m for m in models if cells.get(m)]


def _run_name(report: Mapping[str, Any], run_dir: Path) -> str:
    return Path(str(report.get("config", {}).get("run-dir") or run_dir)).name or str(run_dir)


# ---------------------------------------------------------------- sections


def _header(report: Mapping[str, Any], run_dir: Path, sites: Sequence[str]) -> str:
    config = report.get("config", {})
    model = " ".join(str(config[k]) for k in ("model", "model-preset") if k in config) or "?"
    facts = {
        "Run": _run_name(report, run_dir),
        "Model": f"{model}, scale ×{config.get('scale', '?')}, {config.get('spatial-dims', '?')}D",
        "Sites": f"{len(sites)}: {', '.join(sites)}" if sites else "no cross-site scores (see the notes)",
        "Rounds": str(config.get("num-rounds", "?")),
        "Aggregation": _aggregation(config),
        "Created": str(report.get("created", "?")),
    }
    facts_html = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts.items())
    links = [("notes", "Notes"), ("refusals", "Refusals"), ("rejections", "Rejected updates"),
             ("cross-site", "Cross-site"), ("gain", "Gain"), ("rounds", "Rounds"), ("leave-one-out", "Leave-one-out"),
             ("consistency", "Consistency"), ("previews", "Crops"), ("sites", "Sites")]
    if not report.get("leave_one_out"):
        links.remove(("leave-one-out", "Leave-one-out"))
    if not report.get("refusals"):
        links.remove(("refusals", "Refusals"))
    if not report.get("rejections"):
        links.remove(("rejections", "Rejected updates"))
    privacy = report.get("privacy") or {}
    if privacy.get("dp", "none") != "none" or privacy.get("membership"):
        links.insert(links.index(("cross-site", "Cross-site")), ("privacy", "Privacy"))
    if any((report.get("model_options") or {}).values()):
        links.insert(links.index(("cross-site", "Cross-site")), ("model-options", "Personal & conditioned"))
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in links)
    notes = report.get("notes") or []
    notes_html = ("<ul>" + "".join(f"<li>{escape(str(n))}</li>" for n in notes) + "</ul>") if notes \
        else '<p class="note">No notes.</p>'
    return (f'<header id="header"><h1>Federated super-resolution: cross-site report</h1>'
            f'<dl class="run">{facts_html}</dl><nav>{nav}</nav></header>\n' + _section("notes", "Notes", notes_html))


def _aggregation(config: Mapping[str, Any]) -> str:
    """The run's strategy, and its sampling and transfer dtype where they are not the defaults."""
    parts = [str(config.get("strategy", "fedavg"))]
    parts += [f"{key} {config[key]:g}" for key in ("fraction-train", "fraction-evaluate") if config.get(key, 1.0) < 1]
    if config.get("transfer-dtype", "float32") != "float32":
        parts.append(f"weights sent as {config['transfer-dtype']}")
    return ", ".join(parts)


def _refusals(report: Mapping[str, Any]) -> str:
    """The requests sites refused (report.json's ``refusals``): a table, or nothing when none was refused."""
    refusals = report.get("refusals") or []
    if not refusals:
        return ""
    rows = ([escape(str(r["site"])), escape(str(r["round"])), escape(str(r["request"])), escape(str(r["experiment"])),
             escape(str(r["category"])), escape(str(r["reason"]))] for r in refusals)
    body = ("<p>Requests a site declined, with the reason it gave (its site.toml <code>[policy]</code>, or its "
            "privacy budget); for that request the site was absent, as a site that does not reply.</p>"
            + _table(["site", "round", "phase", "experiment", "category", "reason"], rows,
                     text_columns=(0, 2, 3, 4, 5)))
    return _section("refusals", "Refusals", body)


def _rejections(report: Mapping[str, Any]) -> str:
    """The replies the coordinator did not use (report.json's ``rejections``): the count per site and rule, and
    every rejection; nothing when none was rejected."""
    rejections = report.get("rejections") or []
    if not rejections:
        return ""
    counts = Counter((str(r["site"]), str(r["rule"])) for r in rejections)
    rows = ([escape(str(r["site"])), escape(str(r["round"])), escape(str(r["request"])), escape(str(r["experiment"])),
             escape(str(r["rule"])), escape(str(r["reason"]))] for r in rejections)
    body = ("<p>Replies the coordinator checked and did not use: weights or numbers that do not fit the global "
            "model, are not finite, claim more examples than the site has, or moved the weights far more than the "
            "other sites did (rule <code>norm</code>). That site was left out of that round, as a site that does "
            "not reply; site <code>*</code> is a round whose aggregate was not finite and was not adopted (the "
            "weights stayed those of the round before).</p>"
            + _table(["site", "rule", "rejected replies"],
                     ([escape(site), escape(rule), str(n)] for (site, rule), n in sorted(counts.items())),
                     text_columns=(0, 1))
            + _table(["site", "round", "phase", "experiment", "rule", "reason"], rows, text_columns=(0, 2, 3, 4, 5)))
    return _section("rejections", "Rejected updates", body)


def _privacy(report: Mapping[str, Any]) -> str:
    """What differential privacy the run spent, and the membership-inference check of the global model
    (report.json's ``privacy``); nothing when the run has neither."""
    privacy = report.get("privacy") or {}
    parts = [_dp_spent(privacy)] if privacy.get("dp", "none") != "none" else []
    membership = privacy.get("membership") or {}
    if membership:
        rows = ([escape(site), f"{m['mia-auc']:.3f}", f"{m['mia-advantage']:.3f}",
                 f"{int(m['mia-members'])} / {int(m['mia-non-members'])}"] for site, m in sorted(membership.items()))
        parts.append("<h3>Membership inference</h3><p>A loss-threshold attack on the global model at each site: "
                     "how well its error on a slice tells the site's training patients from its test patients "
                     "(AUC 0.5: no better than chance; advantage: best true-positive minus false-positive rate). "
                     "Part of any gap is patient variation; compare with a run without DP on the same sites.</p>"
                     + _table(["site", "attack AUC", "advantage", "slices (train / test)"], rows))
    return _section("privacy", "Privacy", "".join(parts)) if parts else ""


def _model_options(report: Mapping[str, Any]) -> str:
    """Which parameters stayed at the sites and how a new site is served (personal = "head"), and what the network
    was conditioned on (condition = "acquisition"): report.json's ``model_options``; nothing when neither."""
    options = report.get("model_options") or {}
    parts = []
    personal = options.get("personal")
    if personal:
        total = personal["personal_parameters"] + personal["shared_parameters"]
        parts.append(
            "<h3>Personal head</h3>"
            f"<p>Modules <code>{escape(', '.join(personal['modules']))}</code>: {personal['personal_parameters']:,} "
            f"of {total:,} parameters ({100 * personal['personal_parameters'] / max(total, 1):.1f} %) stayed at each "
            f"site. {escape(personal['kept'][:1].upper() + personal['kept'][1:])}.</p><ul>"
            + "".join(f"<li>{escape(personal[key][:1].upper() + personal[key][1:])}.</li>"
                      for key in ("evaluation", "new_site", "released"))
            + "</ul><details><summary>Personal weights</summary><p><code>"
            + escape(", ".join(personal["weights"])) + "</code></p></details>")
    conditioning = options.get("conditioning")
    if conditioning:
        rows = ([escape(f["name"]), escape(str(f["unit"])), f"{f['scale']:g}", escape(f["meaning"])]
                for f in conditioning["fields"])
        parts.append(
            "<h3>Conditioned on the acquisition</h3>"
            f"<p>{escape(conditioning['method'])}; feature map(s) <code>"
            f"{escape(', '.join(conditioning['feature_maps']))}</code>, {conditioning['film_parameters']:,} "
            f"parameters (shared). Sources: {escape(conditioning['sources'])}.</p>"
            + _table(["field", "unit", "scale", "meaning"], rows, text_columns=(0, 1, 3)))
    return _section("model-options", "Personalisation and conditioning", "".join(parts)) if parts else ""


def _dp_spent(privacy: Mapping[str, Any]) -> str:
    """The DP part of the Privacy section: central DP's client-level epsilon, or each site's spent epsilon."""
    central = privacy.get("central")
    if central:
        return (f"<p>Central differential privacy: every site's update clipped ({escape(str(central['clipping']))}, "
                f"norm {central['clip_norm']:g}) and Gaussian noise on their average; the privacy unit is the "
                "<strong>site</strong> (whether a hospital took part at all).</p>"
                + _table(["unit", "epsilon", "delta", "noise multiplier", "rounds"],
                         [["site", f"{central['epsilon']:.3f}", f"{central['delta']:g}",
                           f"{central['noise_multiplier']:.3f}", str(central["rounds"])]]))
    rows = ([escape(site), f"{p['epsilon']:.3f}", f"{p['delta']:g}", f"{p['noise_multiplier']:.3f}",
             f"{p['sample_rate']:.3f}", str(int(p["units"])), f"{p['clipped_fraction']:.0%}", str(p["round"])]
            for site, p in sorted(privacy.get("sites", {}).items()))
    warning = privacy.get("warning")
    return (f"<p>DP-SGD at every site, the privacy unit is the <strong>{escape(str(privacy.get('unit')))}"
            f"</strong>; noise planned for a target epsilon of {escape(str(privacy.get('target_epsilon')))} over "
            "the whole training. Epsilon is each site ledger's total (across runs, at the site's delta) after its "
            "last round of this run; refused rounds spent nothing.</p>"
            + (f'<p class="warning">{escape(warning)}</p>' if warning else "")
            + _table(["site", "epsilon", "delta", "noise multiplier", "sampling rate", "units", "clipped",
                      "after round"], rows))


def _cross_site(report: Mapping[str, Any], models: Sequence[str], sites: Sequence[str]) -> str:
    parts = ["<p>Each model scored on each site's test scans: the mean over scans and its 95% bootstrap interval "
             "(hover a table cell for its note). Hatched cells do not exist.</p>"]
    for metric in report["metrics"]:
        cells = report["cross_site"].get(metric, {})
        rows = _present_models(cells, models)
        if metric in CONSISTENCY or not rows:
            continue
        about = report["metrics"][metric]
        title = _metric_title(report, metric)
        png = plots.heatmap_png(cells, rows, sites, title, about.get("higher_is_better", True),
                                _digits(report, metric), centre=0.0 if metric in GAINS else None)
        parts.append(f'<h3>{escape(title)}</h3>'
                     + _figure(png, f"{metric} heatmap", "Rows: models; columns: sites. In each cell the mean over "
                               "the site's test scans and, below it, its 95% interval.")
                     + _matrix_table(report, metric, rows, sites))
    if len(parts) == 1:
        parts.append('<p class="note">No model was scored on test scans (see the notes).</p>')
    pooled = report.get("pooled_test") or {}
    pooled_models = [m for m in models if any(m in pooled.get(metric, {}) for metric in pooled)]
    if pooled_models:
        metrics = [m for m in report["metrics"] if m in pooled]
        parts.append("<h3>All sites' test scans pooled</h3><p>Models scored at every site that has test scans "
                     "(↑ higher is better, ↓ lower is better).</p>"
                     + _table(["model", *(escape(_metric_title(report, m, short=True)) for m in metrics)],
                              ([escape(model), *(_cell(pooled[m].get(model), _digits(report, m)) for m in metrics)]
                               for model in pooled_models)))
    return _section("cross-site", "Cross-site scores", "\n".join(parts))


def _matrix_table(report: Mapping[str, Any], metric: str, models: Sequence[str], sites: Sequence[str]) -> str:
    """The MODEL x SITE numbers of ``metric`` as a table, folded under a summary line."""
    cells = report["cross_site"][metric]
    digits = _digits(report, metric)
    table = _table(["model", *map(escape, sites)],
                   ([escape(m), *(_cell(cells[m].get(s), digits) for s in sites)] for m in models))
    label = report["metrics"].get(metric, {}).get("label", metric)
    return f"<details><summary>{escape(label)}: the numbers</summary>{table}</details>"


def _gains(report: Mapping[str, Any], models: Sequence[str], sites: Sequence[str]) -> str:
    cells = report["cross_site"].get("psnr-gain", {})
    rows = _present_models(cells, models)
    if not rows:
        return _section("gain", "Gain over interpolation", '<p class="note">No PSNR gain was scored.</p>')
    kinds = {m: report["models"][m].get("kind", "") for m in rows}
    png = plots.site_bars_png(cells, rows, sites, kinds, "PSNR gain over the site's interpolation (dB)",
                              "PSNR gain (dB)", {s: 0.0 for s in sites}, "interpolation (0 dB)")
    return _section("gain", "Gain over interpolation", _figure(
        png, "PSNR gain bars", "Per site: each model's PSNR minus the site's interpolation baseline, scan by scan "
        "(paired), with its 95% interval; the numbers are in the psnr-gain table above."))


def _rounds(report: Mapping[str, Any], sites: Sequence[str]) -> str:
    rows = report.get("rounds") or []
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    if not experiments:
        return _section("rounds", "Validation per round", '<p class="note">No evaluation rounds were recorded.</p>')
    parts = ["<p>Each site's validation split, scored after every round (round 0: the untrained model).</p>"]
    named = list(dict.fromkeys([*sites, *(r["site"] for r in rows)]))  # a run without cross-site scores lists none
    for experiment in experiments:
        mine = [r for r in rows if r["experiment"] == experiment]
        present = {r["site"] for r in mine}
        png = plots.round_curves_png(mine, named, f"experiment: {experiment}")
        parts.append(_figure(png, f"validation curves of {experiment}",
                             f"Experiment {experiment}: {len(present)} sites; a site keeps its colour in every "
                             "experiment."))
    return _section("rounds", "Validation per round", "\n".join(parts))


def _leave_one_out(report: Mapping[str, Any]) -> str:
    runs = report.get("leave_one_out") or {}
    if not runs:
        return ""
    parts = ["<p>Each site scored by a federation trained without it (held out: as an unseen scanner), by the "
             "federation it belongs to, and by the best model trained alone at one other site.</p>"]
    for metric in LEAVE_ONE_OUT_METRICS:
        if not any(metric in result.get("held_out", {}) for result in runs.values()):
            continue
        higher = report["metrics"].get(metric, {}).get("higher_is_better", True)
        digits = _digits(report, metric)
        rows = []
        for site, result in runs.items():
            best, best_cell = _best_elsewhere(result.get("local_elsewhere", {}), metric, higher)
            rows.append([escape(site), _cell(result.get("held_out", {}).get(metric), digits),
                         _cell(result.get("in_federation", {}).get(metric), digits),
                         escape(best) if best else '<span class="missing">none scored here</span>',
                         _cell(best_cell, digits)])
        head = ["site", "held out", "in federation", "best local-only model trained elsewhere", "its score"]
        parts.append(f"<h3>{escape(_metric_title(report, metric))}</h3>" + _table(head, rows, text_columns=(0, 3)))
    return _section("leave-one-out", "Leave-one-out", "\n".join(parts))


def _best_elsewhere(local: Mapping[str, Mapping[str, Any]], metric: str,
                    higher_is_better: bool) -> tuple[str | None, Mapping[str, Any] | None]:
    """The local model (trained at another site) with the best mean of ``metric``, and its cell."""
    scored = [(model, cells[metric]) for model, cells in local.items() if metric in cells]
    if not scored:
        return None, None
    sign = 1.0 if higher_is_better else -1.0
    return max(scored, key=lambda item: sign * item[1]["mean"])


def _consistency(report: Mapping[str, Any], models: Sequence[str], sites: Sequence[str]) -> str:
    kinds = {m: report["models"][m].get("kind", "") for m in models}
    parts = []
    noise = {s: float(report["sites"][s]["noise_level"]) for s in sites
             if report["sites"][s].get("noise_level") is not None}
    captions = {
        "dc-error": ("the SR output re-acquired with the site's own acquisition model, compared with the LR input "
                     "(RMS). Near the site's noise level (dashed) is ideal; far above it, the model changed what "
                     "the scanner measured.", noise, "site noise level"),
        "hf-excess": ("high-frequency energy (beyond the LR band) the model added that the HR scan does not "
                      "have, relative to HR's: 0 invents nothing.", {s: 0.0 for s in sites}, "0 (invents nothing)"),
    }
    for metric, (caption, reference, reference_label) in captions.items():
        cells = report["cross_site"].get(metric, {})
        rows = _present_models(cells, models)
        if not rows:
            continue
        title = _metric_title(report, metric)
        png = plots.site_bars_png(cells, rows, sites, kinds, title, report["metrics"].get(metric, {}).get(
            "label", metric), reference, reference_label)
        parts.append(f"<h3>{escape(title)}</h3>" + _figure(png, f"{metric} bars", f"{title}: {caption}")
                     + _matrix_table(report, metric, rows, sites))
    body = "\n".join(parts) or '<p class="note">No data-consistency scores were recorded.</p>'
    return _section("consistency", "Data consistency", body)


def _previews(report: Mapping[str, Any], run_dir: Path, sites: Sequence[str]) -> str:
    previews = report.get("previews") or {}
    parts = ["<p>One crop of one test scan per site, for sites whose site.toml lets previews leave the site. "
             "Pixels are enlarged, not smoothed.</p>"]
    for site in sites:
        if site not in previews:
            shares = report["sites"][site].get("shares_previews")
            why = "its images stay at the site" if not shares else "no preview crop was recorded"
            parts.append(f'<p class="note preview-absent"><b>{escape(site)}</b>: {why}.</p>')
            continue
        arrays = _load_preview(run_dir / previews[site]["file"], site)
        shown = [m for m in previews[site].get("models", []) if f"sr:{m}" in arrays]
        parts.append(f"<h3>{escape(site)}</h3>" + (_crops_table(arrays, shown, site) if shown else
                                                   '<p class="note">The preview has no model output.</p>'))
    return _section("previews", "Example crops", "\n".join(parts))


def _crops_table(arrays: Mapping[str, np.ndarray], models: Sequence[str], site: str) -> str:
    """One row per model (its SR and |SR - HR|) beside the LR, interpolation and HR crops they share.

    Tiles are shown :data:`CROP_PIXELS` CSS pixels wide (nearest-neighbour); the error maps share one scale, up to
    the 99.5th percentile of every model's and the interpolation's error, drawn under the table.
    """
    hr = arrays["hr"]
    errors = {m: np.abs(arrays[f"sr:{m}"] - hr) for m in models}
    errors["interpolation"] = np.abs(arrays["interpolation"] - hr)
    top = max(float(np.percentile(e, 99.5)) for e in errors.values()) or 1e-3
    width = hr.shape[1] * max(1, CROP_PIXELS // hr.shape[1])

    def tile(png: bytes, alt: str) -> str:
        return _image(png, alt, width)

    def error_tile(name: str) -> str:
        return tile(plots.error_png(errors[name], top), f"{site}: |{name} - HR|")

    span = f'rowspan="{len(models)}"'
    rows = []
    for index, model in enumerate(models):
        sr = f'<td>{tile(plots.grey_png(arrays[f"sr:{model}"]), f"{site}: SR of {model}")}</td>'
        error = f"<td>{error_tile(model)}</td>"
        if index == 0:
            lr = f'<td {span}>{tile(plots.grey_png(arrays["lr"]), f"{site}: LR")}</td>'
            interpolation = (f'<td {span}>{tile(plots.grey_png(arrays["interpolation"]), f"{site}: interpolation")}'
                             f'<div class="sub">|interpolation − HR|</div>{error_tile("interpolation")}</td>')
            high = f'<td {span}>{tile(plots.grey_png(hr), f"{site}: HR")}</td>'
            cells = [lr, interpolation, sr, high, error]
        else:
            cells = [sr, error]
        rows.append(f"<tr><th>{escape(model)}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("model", "LR", "interpolation", "SR", "HR", "|SR − HR|"))
    scale = (f'<div class="scale">|error|: 0 <span class="bar" style="background:{plots.error_gradient_css()}">'
             f"</span> {top:.3g} (intensity, HR in [0, 1])</div>")
    return f'<div class="wrap"><table class="crops"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}' \
           f"</tbody></table></div>{scale}"


def _load_preview(path: Path, site: str) -> dict[str, np.ndarray]:
    """The arrays of one preview file (previews/<SITE>.npz): ``lr``, ``interpolation``, ``hr``, ``sr:<MODEL>``.

    Raises:
        ReportInputError: the file cannot be read, lacks one of the first three arrays or holds one that is not
            2D (names the file).
    """
    hint = "Restore it from the run, or delete it (the report then shows the site without a preview) and run " \
           "`fedsr report RUN_DIR` again"
    try:
        with np.load(path) as data:
            arrays = {key: np.asarray(data[key], dtype=np.float32) for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ReportInputError(path, f"the preview of {site} cannot be read ({error})", hint) from error
    missing = [key for key in ("lr", "interpolation", "hr") if key not in arrays]
    if missing:
        raise ReportInputError(path, f"the preview of {site} lacks {', '.join(missing)}", hint)
    not_2d = [key for key, array in arrays.items() if array.ndim != 2]
    if not_2d:
        raise ReportInputError(path, f"the preview of {site} holds arrays that are not 2D crops: "
                                     f"{', '.join(not_2d)}", hint)
    return arrays


def _sites_table(report: Mapping[str, Any], sites: Sequence[str]) -> str:
    def yes(flag: Any) -> str:
        return "yes" if flag else "no"

    rows = []
    for site in sites:
        about = report["sites"][site]
        scans = about.get("scans", {})
        rows.append([escape(site), *(escape(str(about.get(k, ""))) for k in ("modality", "scanner", "acquisition")),
                     escape(str(about.get("noise_level", ""))), escape(str(about.get("baseline", ""))),
                     *(escape(str(scans.get(split, 0))) for split in ("train", "val", "test")),
                     yes(about.get("shares_local_model")), yes(about.get("shares_previews")),
                     escape(about.get("test_note") or "")])
    head = ["site", "modality", "scanner", "acquisition", "noise level", "baseline", "train scans", "val scans",
            "test scans", "shares local model", "shares previews", "test note"]
    return _section("sites", "Sites", _table(head, rows, text_columns=(0, 1, 2, 3, 5, 9, 10, 11)))
