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
    ("ari_answer", "ARI of the clusters with answers", 0.0),
    ("overlap_answer", "answer label overlap (class fraction 0.1)", 0.25),
)


def layer_profiles(table: xr.Dataset, path: Path, title: str) -> Path:
    """One panel per metric, layers on the x axis, one line per method; the last panel holds the data
    overlap of each compared pair (``table`` as report.method_table makes it)."""
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).ravel()
    colours = _colours(len(table.method))
    for ax, (name, label, chance) in zip(axes, PANELS, strict=False):  # the last axis: comparisons
        for method, colour in zip(table.method.values, colours, strict=True):
            ax.plot(table.layer, table[name].sel({"method": method}), marker="o", markersize=3, color=colour,
                    label=str(method))
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_title(label)
    ax = axes[-1]
    for pair in table.pair.values if "pair" in table.dims else []:
        ax.plot(table.layer, table.data_overlap.sel(pair=pair), marker="o", markersize=3, color="black", label=pair)
    ax.set_title("data overlap of two methods (k = 30)")
    ax.set_ylim(0, 1)
    if "pair" in table.dims:
        ax.legend(fontsize=8)
    axes[0].legend(fontsize=8, title="method")
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[3:]:
        ax.set_xlabel("layer")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return path


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
