"""The images of ``report.html`` as PNG bytes: figures drawn with matplotlib, and the example crops' tiles.

Every figure is a :class:`matplotlib.figure.Figure` saved through the Agg canvas directly: pyplot is never
imported, so no global backend, figure registry or rcParams change that other code could depend on.

Sizes are in inches at :data:`DPI` (1 inch = 100 pixels); figures grow with the number of models (rows) and
sites (columns or panels) so that labels keep :data:`FONT` points (11 pixels) however large the run is.
Strings from the run (site and model names) are drawn as plain text: :func:`plain` keeps a ``$`` in a name
from being read as matplotlib math. Crop tiles keep one PNG pixel per image pixel (the page enlarges them).
PNGs are encoded by Pillow, the image library matplotlib itself writes PNGs with.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import CenteredNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

#: Pixels per inch of every figure: with :data:`FONT` this gives 11-pixel labels in the browser at 100% zoom.
DPI = 100
#: Label size (points).
FONT = 8
#: How a cell that does not exist is drawn (heatmaps) and named (legends).
MISSING = {"facecolor": "0.93", "edgecolor": "0.65", "hatch": "///", "linewidth": 0.0}
MISSING_LABEL = "not scored here (the model stays at its own site, or the site has no test scans)"
#: Colour map of the example crops' error maps (|SR - HR|).
ERROR_CMAP = "magma"
#: Bar colour of each model kind (cross_site.json's ``models[M].kind``).
KIND_COLOURS = {"federated": "tab:blue", "pooled": "tab:green", "local": "tab:orange", "holdout": "tab:purple",
                "interpolation": "tab:gray"}

Cell = Mapping[str, Any]
"""One report cell: ``mean`` (float), ``ci95`` ([lo, hi] or None), ``n_scans`` (int), ``note`` (str or None)."""
Cells = Mapping[str, Mapping[str, Cell]]
"""``{MODEL: {SITE: Cell}}`` of one metric."""


def plain(text: str) -> str:
    """``text`` drawn literally: matplotlib reads ``$...$`` as math unless the dollar is escaped."""
    return text.replace("$", r"\$")


def decimals(values: Iterable[float]) -> int:
    """Decimals that give the largest ``|value|`` 4 significant digits (0 to 6): one precision for all the values
    of a metric, so that its numbers line up in a table."""
    largest = max((abs(v) for v in values), default=0.0)
    return 4 if largest == 0 else min(6, max(0, 3 - math.floor(math.log10(largest))))


def cell_text(cell: Cell, digits: int, separator: str = " ") -> str:
    """``mean [lo, hi]`` (95% interval), or ``mean (n=N, no interval)``, with ``digits`` decimals."""
    interval = cell.get("ci95")
    below = f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval \
        else f"(n={cell['n_scans']}, no interval)"
    return f"{cell['mean']:.{digits}f}{separator}{below}"


def png(fig: Figure) -> bytes:
    """The figure drawn by Agg as a 256-colour palette PNG.

    A figure's flat fills and anti-aliased text need far fewer colours than 24-bit RGBA stores: the palette
    makes the files 3-4 times smaller, which keeps a 10-site report under 5 MB. Pillow's maximum-coverage
    quantiser, no dithering: on these figures it stays within a few levels of every drawn colour (median cut
    shifted whole colour-bar bands).
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = PIL.Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    return _pil_png(rgb.quantize(256, method=PIL.Image.Quantize.MAXCOVERAGE, dither=PIL.Image.Dither.NONE))


def _label_inches(labels: Sequence[str], points: float = FONT) -> float:
    """Rough width (inches) of the longest label at ``points``: about 0.6 em per character."""
    return 0.6 * points / 72 * max((len(label) for label in labels), default=0)


def heatmap_png(cells: Cells, models: Sequence[str], sites: Sequence[str], title: str, higher_is_better: bool,
                digits: int, centre: float | None = None) -> bytes:
    """MODEL x SITE heatmap: rows ``models``, columns ``sites``, each cell its mean and 95% interval (``digits``
    decimals).

    Colours run from worse (dark) to better (bright) whichever direction the metric improves in; ``centre``
    (e.g. 0 for a gain), when the values straddle it, makes the map diverge there, symmetric about it (red
    worse, blue better).
    A cell absent from ``cells`` is hatched grey and named in the legend.
    """
    values = np.full((len(models), len(sites)), np.nan)
    for i, model in enumerate(models):
        for j, site in enumerate(sites):
            if site in cells.get(model, {}):
                values[i, j] = cells[model][site]["mean"]
    cell_w, cell_h = 1.15, 0.42
    width = _label_inches(models) + cell_w * len(sites) + 1.6
    height = cell_h * len(models) + 0.45 * _label_inches(sites) + 1.3
    fig = Figure(figsize=(max(width, 5.0), max(height, 2.6)), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if centre is not None and low < centre < high:
        norm: Normalize = CenteredNorm(centre, max(centre - low, high - centre))
        name = "RdBu" if higher_is_better else "RdBu_r"
    else:
        norm = Normalize(low, high if high > low else low + 1.0)
        name = "viridis" if higher_is_better else "viridis_r"
    # 64 levels: finer than the eye ranks cells by colour (the numbers are written in them), and few enough that
    # the 256-colour PNG (see png) keeps every level exactly.
    cmap = colormaps[name].resampled(64)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for i, model in enumerate(models):
        for j, site in enumerate(sites):
            if np.isnan(values[i, j]):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, **MISSING))
                continue
            red, green, blue, _ = image.cmap(image.norm(values[i, j]))
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(j, i, cell_text(cells[model][site], digits, "\n"), ha="center", va="center", fontsize=FONT - 1,
                    color=ink)
    ax.set_xticks(range(len(sites)), [plain(s) for s in sites], rotation=30, ha="right", rotation_mode="anchor",
                  fontsize=FONT)
    ax.set_yticks(range(len(models)), [plain(m) for m in models], fontsize=FONT)
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(len(sites) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(models) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title(plain(title), fontsize=FONT + 2, loc="left")
    fig.colorbar(image, ax=ax, shrink=min(1.0, 4.0 / max(height, 4.0)), aspect=15).ax.tick_params(labelsize=FONT)
    if np.isnan(values).any():
        fig.legend(handles=[Patch(**MISSING, label=MISSING_LABEL)], loc="outside lower left", fontsize=FONT,
                   frameon=False)
    return png(fig)


def site_bars_png(cells: Cells, models: Sequence[str], sites: Sequence[str], kinds: Mapping[str, str], title: str,
                  xlabel: str, reference: Mapping[str, float], reference_label: str) -> bytes:
    """One panel per site, one horizontal bar per model (coloured by kind), 95% intervals as error bars.

    ``reference``: a vertical dashed line per site (0 for a gain, the site's noise level for dc-error), named
    ``reference_label`` in the legend. A cell without an interval gets a hollow diamond at its mean; a model
    not scored at a site is written "not scored" where its bar would be. Panels share the x axis (one scale).
    """
    columns = min(len(sites), 4)
    rows = math.ceil(len(sites) / columns)
    panel_w, panel_h = 2.9, 0.24 * len(models) + 0.8
    fig = Figure(figsize=(_label_inches(models) + panel_w * columns + 0.4, panel_h * rows + 1.0), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    y = np.arange(len(models))
    for ax, site in zip(axes.flat, sites):
        for k, model in enumerate(models):
            cell = cells.get(model, {}).get(site)
            if cell is None:
                ax.text(0, k, " not scored", va="center", ha="left", fontsize=FONT - 1, color="0.45", style="italic")
                continue
            interval = cell.get("ci95")
            error = None if not interval else [[cell["mean"] - interval[0]], [interval[1] - cell["mean"]]]
            ax.barh(k, cell["mean"], xerr=error, color=KIND_COLOURS.get(kinds.get(model, ""), "tab:gray"),
                    height=0.7, error_kw={"elinewidth": 1.0, "capsize": 2.0, "ecolor": "black"})
            if not interval:
                ax.plot(cell["mean"], k, marker="D", markersize=5, markerfacecolor="white", markeredgecolor="black")
        if site in reference:
            ax.axvline(reference[site], color="tab:red", linestyle="--", linewidth=1.0)
        ax.set_title(plain(textwrap.shorten(site, 48, placeholder="…")), fontsize=FONT, loc="left")
        ax.set_yticks(y, [plain(m) for m in models], fontsize=FONT)
        ax.tick_params(labelsize=FONT, labelbottom=True)
        ax.set_xlabel(xlabel, fontsize=FONT)
        ax.grid(axis="x", color="0.85", linewidth=0.6)
        ax.set_axisbelow(True)
    axes[0, 0].invert_yaxis()
    for ax in axes.flat[len(sites):]:
        ax.set_visible(False)
    present = sorted({kinds.get(m, "") for m in models} & KIND_COLOURS.keys(), key=list(KIND_COLOURS).index)
    handles = [Patch(color=KIND_COLOURS[kind], label=kind) for kind in present]
    handles += [Line2D([], [], color="black", marker="_", markersize=8, linestyle="", label="95% interval"),
                Line2D([], [], marker="D", markerfacecolor="white", markeredgecolor="black", linestyle="",
                       label="no interval (fewer than 3 test scans)"),
                Line2D([], [], color="tab:red", linestyle="--", label=reference_label)]
    fig.legend(handles=handles, loc="outside lower center", fontsize=FONT, frameon=False,
               ncols=max(2, min(len(handles), int(fig.get_figwidth() / 1.7))))
    fig.suptitle(plain(title), fontsize=FONT + 2, x=0.01, ha="left")
    return png(fig)


def round_curves_png(rows: Sequence[Mapping[str, Any]], sites: Sequence[str], title: str) -> bytes:
    """Validation PSNR per round, one colour per site: left the model (solid) beside the interpolation baseline
    (dashed), right the model's gain over that baseline (dB).

    ``rows``: one experiment's evaluate rows (``round``, ``site``, ``psnr``, ``baseline-psnr``); ``sites``: every
    site of the run, in report order, so that a site keeps its colour in every experiment's figure (sites
    without rows here are left out).
    """
    fig = Figure(figsize=(11.0, 3.4), dpi=DPI, layout="constrained")
    scores, gains = fig.subplots(1, 2)
    cmap = colormaps["tab10" if len(sites) <= 10 else "tab20"]
    handles = []
    for index, site in enumerate(sites):
        mine = sorted((r for r in rows if r["site"] == site and "psnr" in r), key=lambda r: r["round"])
        if not mine:
            continue
        colour = cmap(index % cmap.N)
        handles += scores.plot([r["round"] for r in mine], [r["psnr"] for r in mine], color=colour, marker="o",
                               markersize=3, label=plain(site))
        paired = [r for r in mine if "baseline-psnr" in r]
        scores.plot([r["round"] for r in paired], [r["baseline-psnr"] for r in paired], color=colour,
                    linestyle="--", linewidth=1.0)
        gains.plot([r["round"] for r in paired], [r["psnr"] - r["baseline-psnr"] for r in paired], color=colour,
                   marker="o", markersize=3)
    gains.axhline(0.0, color="0.3", linewidth=0.8)
    scores.set_title("validation PSNR (dB)", fontsize=FONT + 1, loc="left")
    gains.set_title("PSNR gain over interpolation (dB)", fontsize=FONT + 1, loc="left")
    for ax in (scores, gains):
        ax.set_xlabel("round", fontsize=FONT)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=FONT)
        ax.grid(color="0.88", linewidth=0.6)
    handles += [Line2D([], [], color="0.2", label="model"),
                Line2D([], [], color="0.2", linestyle="--", linewidth=1.0, label="interpolation baseline")]
    per_row = max(1, int(11.0 / (_label_inches([h.get_label() for h in handles]) + 0.6)))
    fig.legend(handles=handles, loc="outside lower center", fontsize=FONT, frameon=False, ncols=per_row)
    fig.suptitle(plain(title), fontsize=FONT + 2, x=0.01, ha="left")
    return png(fig)


def grey_png(image: np.ndarray) -> bytes:
    """An 8-bit grey PNG of ``image`` (2D, intensities in [0, 1], clipped), one PNG pixel per array pixel."""
    levels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return _pil_png(PIL.Image.fromarray(levels))


def error_png(error: np.ndarray, top: float) -> bytes:
    """``error`` (2D, >= 0) coloured with :data:`ERROR_CMAP` from 0 to ``top`` (clipped above), one PNG pixel per
    array pixel: a palette PNG whose 256 colours are the colour map's."""
    levels = np.round(np.clip(error / top, 0.0, 1.0) * 255).astype(np.uint8)
    image = PIL.Image.fromarray(levels)
    image.putpalette(colormaps[ERROR_CMAP](np.arange(256), bytes=True)[:, :3].ravel().tobytes())
    return _pil_png(image)


def error_gradient_css() -> str:
    """A CSS ``linear-gradient`` of :data:`ERROR_CMAP` from 0 (left) to its top (right): the error maps' scale."""
    stops = colormaps[ERROR_CMAP](np.linspace(0.0, 1.0, 9), bytes=True)
    return "linear-gradient(to right," + ",".join(f"rgb({r},{g},{b})" for r, g, b, _ in stops) + ")"


def _pil_png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png", optimize=True)
    return buffer.getvalue()
