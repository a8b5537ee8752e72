"""The study's figures, drawn with matplotlib's object API (no pyplot: no global state, no display).

Each ``draw_*`` function returns the Figure and ``save`` writes it, so that a caller (or a test) can look at
what was drawn before it is written. Every line has its own colour (Okabe-Ito, told apart with the common
colour-vision deficiencies), marker and line style, so that no reader depends on hue alone; panels that
show the same metric share one y scale, so that a difference of 0.005 is not drawn as large as one of 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from scipy.cluster.hierarchy import dendrogram

FORMATS = ("png", "svg", "pdf")
DPI = 120  # of the PNG; SVG and PDF are vector
# Okabe & Ito (2008), yellow last: the least visible on white
PALETTE = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # 7 against 8 colours: no two lines of the first 56 look alike
LINESTYLES = ("-", "--", "-.", ":")
CHANCE_STYLE = {"color": "grey", "linestyle": (0, (1, 3)), "linewidth": 1.2}


@dataclass(frozen=True)
class Metric:
    """One panel: the table's variable, its title, its y label (the quantity and its unit), the panels of
    the same ``scale`` share y limits, and the chance level drawn as a line (None: no line)."""

    name: str
    title: str
    ylabel: str
    scale: str
    chance: float | None = None


ARI = "adjusted Rand index"
SHARE = "share of the k nearest neighbours"
METRICS = {
    m.name: m
    for m in (
        Metric("id", "intrinsic dimension (Gride)", "intrinsic dimension", "id"),
        Metric("n_clusters", "density peaks (ADP clusters)", "clusters (count)", "n_clusters"),
        Metric("ari_subject", "ARI of the clusters with subjects", ARI, "ari", 0.0),
        Metric("overlap_subject", "subject label overlap", f"label overlap ({SHARE})", "overlap"),
        Metric("ari_answer", "ARI of the clusters with the right answers", ARI, "ari", 0.0),
        Metric("ari_prediction", "ARI of the clusters with the model's answers", ARI, "ari", 0.0),
        Metric("overlap_answer", "answer label overlap", f"label overlap ({SHARE})", "overlap", 0.25),
    )
}
DATA_OVERLAP = Metric("data_overlap", "data overlap of two methods", f"data overlap ({SHARE})", "data_overlap")
LAYER_METRICS = tuple(METRICS)  # layers: these, then the data overlap of each compared pair
TRAINING_METRICS = ("ari_subject", "ari_answer", "ari_prediction", "overlap_answer")  # across fine-tuning steps


def style(index: int) -> dict[str, Any]:
    """The colour, marker and line style of the ``index``-th line of a panel."""
    return {
        "color": PALETTE[index % len(PALETTE)],
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "markersize": 4,
    }


def draw_layers(table: xr.Dataset, title: str) -> Figure:
    """One panel per metric, layers on the x axis, one line per method; the last panel holds the data
    overlap of each compared pair (``table`` as report.method_table makes it)."""
    fig = Figure(figsize=(20, 8.5), layout="constrained")
    axes = list(fig.subplots(2, 4).ravel())
    _metric_panels(axes[:-1], table, "method", [METRICS[n] for n in LAYER_METRICS])
    pairs = [str(p) for p in table.pair.values] if "pair" in table.dims else []
    ax = axes[-1]
    for i, pair in enumerate(pairs):  # styles after the methods': a pair is not mistaken for a method
        ax.plot(table.layer, table.data_overlap.sel(pair=pair), label=pair, **style(i + len(table.method)))
    _label(ax, DATA_OVERLAP)
    ax.set_ylim(0, 1)
    if pairs:
        ax.legend(fontsize=8, title="compared pair")
    else:
        ax.text(0.5, 0.5, "no compared pair", ha="center", va="center", transform=ax.transAxes)
    _legend(fig, axes, "method")
    fig.suptitle(title)
    return fig


def draw_training(table: xr.Dataset, title: str) -> Figure:
    """Subject ARI, answer ARI (right and the model's own) and answer label overlap over layer, one line
    per fine-tuning step (``table`` over a ``step`` dimension, 0 for the base model)."""
    fig = Figure(figsize=(16, 8.5), layout="constrained")
    axes = list(fig.subplots(2, 2).ravel())
    _metric_panels(axes, table, "step", [METRICS[n] for n in TRAINING_METRICS])
    _legend(fig, axes, "training step")
    fig.suptitle(title)
    return fig


def draw_dendrogram(tree: dict[str, Any], title: str, method: str) -> Figure:
    """The density peaks of one layer joined by saddle depth; leaves named by majority subject, its share
    of the cluster and the cluster's size."""
    labels = [
        f"{label.replace('_', ' ')}: {share:.0%} of {size}"
        for label, share, size in zip(tree["labels"], tree["majority_share"], tree["sizes"])
    ]
    fig = Figure(figsize=(10, 1.8 + 0.3 * len(labels)), layout="constrained")
    ax = fig.subplots()
    dendrogram(
        tree["linkage"],
        labels=labels,
        orientation="right",
        ax=ax,
        color_threshold=0,
        leaf_font_size=9,
        above_threshold_color="black",
    )
    ax.set_xlabel("highest peak log-density minus saddle log-density")
    ax.set_ylabel("density peak: majority subject, its share of the cluster, size")
    ax.legend(handles=[Line2D([], [], color="black", label=method)], title="method", fontsize=8, loc="lower right")
    ax.set_title(title)
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` in the format its suffix names (one of FORMATS). SVG and PDF keep their text as text,
    so that labels can be searched, read by tools and edited in a vector editor."""
    fmt = path.suffix.removeprefix(".")
    if fmt not in FORMATS:
        raise ValueError(f"figure format {fmt!r}: expected one of {', '.join(FORMATS)}")
    with rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        fig.savefig(path, format=fmt, dpi=DPI)
    return path


def _metric_panels(axes: list[Axes], table: xr.Dataset, dim: str, metrics: list[Metric]) -> None:
    """One panel per metric over layer, one line per value of ``dim``; panels of one scale share y."""
    first: dict[str, Axes] = {}
    for ax, metric in zip(axes, metrics, strict=True):
        for i, value in enumerate(table[dim].values):
            ax.plot(table.layer, table[metric.name].sel({dim: value}), label=str(value), **style(i))
        if metric.chance is not None:
            ax.axhline(metric.chance, label="chance", **CHANCE_STYLE)
        _label(ax, metric)
        if metric.scale in first:
            ax.sharey(first[metric.scale])
        first.setdefault(metric.scale, ax)
        if metric.name == "n_clusters":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _label(ax: Axes, metric: Metric) -> None:
    ax.set_title(metric.title)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _legend(fig: Figure, axes: list[Axes], title: str) -> None:
    """One legend beside the panels for the lines they share (every method or step, and chance)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        if ax.get_legend() is None:  # a panel with its own legend (the compared pairs) keeps its lines
            for handle, label in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(label, handle)
    fig.legend(entries.values(), entries.keys(), loc="outside right upper", title=title, fontsize=9)
