"""The study's figures, drawn with matplotlib's object API (no pyplot: no global state, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.cluster.hierarchy import dendrogram

# (variable, panel title, chance level or None); the last panel is the comparison of two methods
PANELS = (
    ("id", "intrinsic dimension (Gride, scale 16)", None),
    ("n_clusters", "density peaks (ADP clusters, Z = 1.6)", None),
    ("ari_subject", "ARI of the clusters with subjects", 0.0),
    ("overlap_subject", "subject label overlap (class fraction 0.3)", None),
    ("ari_answer", "ARI of the clusters with the right answers", 0.0),
    ("ari_prediction", "ARI of the clusters with the model's answers", 0.0),
    ("overlap_answer", "answer label overlap (class fraction 0.1)", 0.25),
)
# how the representation moves across fine-tuning steps
TRAINING_PANELS = (PANELS[2], PANELS[4], PANELS[5], PANELS[6])


def layer_profiles(table: xr.Dataset, path: Path, title: str) -> Path:
    """One panel per metric, layers on the x axis, one line per method; the last panel holds the data
    overlap of each compared pair (``table`` as report.method_table makes it)."""
    fig = Figure(figsize=(19, 8.5), layout="constrained")
    axes = fig.subplots(2, 4, sharex=True).ravel()
    _metric_panels(axes, table, "method", PANELS, _colours(len(table.method)))
    ax = axes[-1]
    pair_colours = _colours(len(table.pair)) if "pair" in table.dims else []
    for pair, colour in zip(table.pair.values if "pair" in table.dims else [], pair_colours):
        ax.plot(table.layer, table.data_overlap.sel(pair=pair), marker="o", markersize=3, color=colour, label=pair)
    ax.set_title("data overlap of two methods (k = 30)")
    ax.set_ylim(0, 1)
    if "pair" in table.dims:
        ax.legend(fontsize=8)
    axes[0].legend(fontsize=8, title="method")
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, axes, 4, title, path)
    return path


def training_steps(table: xr.Dataset, path: Path, title: str) -> Path:
    """Subject ARI, answer ARI (right and the model's own) and answer label overlap over layer, one line
    per fine-tuning step (``table`` over a ``step`` dimension, 0 for the base model)."""
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    _metric_panels(axes, table, "step", TRAINING_PANELS, _colours(len(table.step)))
    axes[0].legend(fontsize=8, title="training step")
    _finish(fig, axes, 2, title, path)
    return path


def _metric_panels(axes, table: xr.Dataset, dim: str, panels: tuple, colours: list) -> None:
    """One panel per metric over layer, one line per value of ``dim``."""
    for ax, (name, label, chance) in zip(axes, panels, strict=False):
        for value, colour in zip(table[dim].values, colours, strict=True):
            ax.plot(table.layer, table[name].sel({dim: value}), marker="o", markersize=3, color=colour,
                    label=str(value))
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_title(label)


def _finish(fig: Figure, axes, columns: int, title: str, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[-columns:]:
        ax.set_xlabel("layer")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def peak_dendrogram(tree: dict[str, Any], path: Path, title: str) -> Path:
    """The density peaks of one layer joined by saddle depth; leaves named by majority subject, its share
    of the cluster and the cluster's size."""
    labels = [f"{label.replace('_', ' ')}: {share:.0%} of {size}"
              for label, share, size in zip(tree["labels"], tree["majority_share"], tree["sizes"])]
    fig = Figure(figsize=(10, 1.8 + 0.3 * len(labels)), layout="constrained")
    ax = fig.subplots()
    dendrogram(tree["linkage"], labels=labels, orientation="right", ax=ax, color_threshold=0, leaf_font_size=9,
               above_threshold_color="black")
    ax.set_xlabel("highest peak log-density minus saddle log-density")
    ax.set_title(title)
    fig.savefig(path, dpi=120)
    return path


def _colours(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["viridis"](v) for v in np.linspace(0.0, 0.85, max(n, 1))]
