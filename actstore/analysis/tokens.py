"""Density analyses of a capture run's token clouds, through a chosen reduction to one point per text or a
random sample of tokens.

A run of every token holds far more rows than the study's analyses take (the neighbour graph is quadratic
in the points), and its rows are not independent (a text's tokens). So a cloud is chosen first:

* ``position:P`` (``last`` is ``position:-1``): each text's token at position P, negative from its end;
* ``mean``: each text's rows averaged (in float64);
* ``sample:N[:SEED]``: N tokens drawn uniformly without replacement, seeded, so the same call gives the same
  cloud.

The cloud then gets what a neighbour graph gives (Gride and 2NN intrinsic dimension, kNN density,
density-peak clusters: ``density.cluster``) and, when a label column is named, the clusters' ARI with it
and the label's neighbourhood overlap. Results are cached in the run's ``derived/tokens`` like the study's.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import adjusted_rand_score

from actstore.analysis import NotAnalysed
from actstore.analysis.density import Clusters, cluster, label_overlap
from actstore.analysis.keys import cache_key
from actstore.analysis.neighbours import knn
from actstore.analysis.params import MIN_SAMPLES, PAPER, DensityParams, fitted
from actstore.analysis.rows import first_unique_rows
from actstore.store import LabelNotFound, Run

READ_ROWS = 1 << 16  # rows read at once when a reduction goes over every row of a layer
_REDUCTION = re.compile(r"last|mean|position:(-?\d+)|sample:(\d+)(?::(\d+))?")


@dataclass(frozen=True)
class Reduction:
    """How a run's rows become the analysed cloud: ``position``, ``mean`` or ``sample`` (see the module)."""

    kind: str
    position: int = -1
    n: int = 0
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> Reduction:
        match = _REDUCTION.fullmatch(text.strip())
        if not match:
            raise ValueError(
                f"unknown reduction {text!r}: use last, position:P (negative from the end), mean, or sample:N[:SEED]"
            )
        if text.startswith("position") or text == "last":
            return cls("position", position=int(match.group(1) or -1))
        if text == "mean":
            return cls("mean")
        return cls("sample", n=int(match.group(2)), seed=int(match.group(3) or 0))

    def __str__(self) -> str:
        return {"position": f"position:{self.position}", "mean": "mean", "sample": f"sample:{self.n}:{self.seed}"}[
            self.kind
        ]


@dataclass
class TokenCloud(Clusters):
    """One layer's cloud as reduced, and what its analysis found."""

    reduction: str
    n_points: int  # after exact duplicates are dropped
    samples: np.ndarray  # the sample (text) id of each point
    label: str | None  # the label column the clusters are compared with
    ari: float | None
    overlap: float | None


def text_blocks(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(first row, number of rows) of each text's block of rows, in stored order (a text's rows are
    contiguous)."""
    samples = run.labels()["sample"]
    if len(samples) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.nonzero(np.diff(samples))[0] + 1])
    return starts, np.diff(np.concatenate([starts, [len(samples)]]))


def cloud_rows(run: Run, reduction: Reduction) -> np.ndarray:
    """For each point of the cloud, the row it is (for ``mean``: its text's first row, whose sample and labels
    it carries)."""
    starts, counts = text_blocks(run)
    if reduction.kind == "position":
        return _rows_at(run, starts, counts, reduction.position)
    if reduction.kind == "sample":
        n_rows = run.n_samples
        if reduction.n > n_rows:
            raise ValueError(f"sample:{reduction.n} asks for more tokens than the {n_rows} rows of run {run.key}")
        rng = np.random.default_rng(reduction.seed)
        return np.sort(rng.choice(n_rows, size=reduction.n, replace=False))
    return starts


def reduce_layer(run: Run, layer: int, reduction: Reduction, site: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(points, rows): the cloud of ``layer`` as float64 (point, width), and ``cloud_rows``."""
    rows = cloud_rows(run, reduction)
    if reduction.kind == "mean":
        starts, counts = text_blocks(run)
        return _means(run, layer, starts, counts, site), rows
    return run.read_rows([layer], rows, site)[0].astype(np.float64), rows


def _rows_at(run: Run, starts: np.ndarray, counts: np.ndarray, position: int) -> np.ndarray:
    """Each text's row at ``position`` in the text; negative counts from the end of the text's rows."""
    positions = run.labels()["position"]
    if position < 0:
        if (counts < -position).any():
            short = int(np.argmax(counts < -position))
            raise ValueError(f"position {position} is beyond a text of {counts[short]} rows in run {run.key}")
        return starts + counts + position
    rows = starts + position
    found = (position < counts) & (positions[np.minimum(rows, len(positions) - 1)] == position)
    if not found.all():
        raise ValueError(f"run {run.key} does not hold position {position} of every text")
    return rows


def _means(run: Run, layer: int, starts: np.ndarray, counts: np.ndarray, site: str | None) -> np.ndarray:
    """Each text's rows averaged, reading the layer in blocks of READ_ROWS rows."""
    text_of_row = np.repeat(np.arange(len(starts)), counts)
    width = run.states(site or run.default_site).shape[2]
    sums = np.zeros((len(starts), width), dtype=np.float64)
    for lo in range(0, run.n_samples, READ_ROWS):
        hi = min(lo + READ_ROWS, run.n_samples)
        np.add.at(sums, text_of_row[lo:hi], run.read_states([layer], lo, hi, site)[0].astype(np.float64))
    return sums / counts[:, None]


def analyse_tokens(
    run: Run,
    layer: int,
    reduction: Reduction,
    params: DensityParams = PAPER,
    site: str | None = None,
    label: str | None = None,
    compute: bool = True,
) -> TokenCloud:
    """The density analysis of one layer's token cloud; neighbour counts fitted to a small cloud as for the
    study's runs; from the run's cache when there, else computed and kept (or NotAnalysed)."""
    site = site or run.default_site
    labels = run.labels()
    if label is not None and label not in labels:
        raise LabelNotFound(run.key, label, list(labels))
    key = cache_key("tokens", run.content_key(), site, layer, str(reduction), dataclasses.asdict(params), label)
    cached = run.load_derived("tokens", key)
    if cached is not None:
        arrays, attrs = cached
        return TokenCloud(**{**{k: attrs[k] for k in _SCALARS}, **arrays})
    if not compute:
        raise NotAnalysed(f"{run.key} {site} layer {layer} ({reduction})")
    points, rows = reduce_layer(run, layer, reduction, site)
    kept, _ = first_unique_rows(points)
    if len(kept) < MIN_SAMPLES:
        raise ValueError(f"{len(kept)} distinct points in the {reduction} cloud of layer {layer}: too few to analyse")
    fit = fitted(params, samples=len(kept))
    distances, indices = knn(points[kept], fit.maxk)
    found = cluster(distances, indices, fit)
    ari = overlap = None
    if label is not None:
        codes = np.unique(labels[label][rows[kept]], return_inverse=True)[1]
        ari = float(adjusted_rand_score(codes, found.assignment))
        if int(fit.subject_fraction * np.bincount(codes).max()) <= fit.maxk:  # else the graph is too small for it
            overlap = label_overlap(indices, codes, fit.subject_fraction)
    result = TokenCloud(
        **vars(found),
        reduction=str(reduction),
        n_points=len(kept),
        samples=labels["sample"][rows[kept]],
        label=label,
        ari=ari,
        overlap=overlap,
    )
    run.save_derived(
        "tokens",
        key,
        {name: getattr(result, name) for name in _ARRAYS},
        {name: getattr(result, name) for name in _SCALARS}
        | {"layer": layer, "site": site, "settings": dataclasses.asdict(fit)},
    )
    return result


_ARRAYS = ("samples", "ids_gride", "assignment", "peak_log_density", "saddle_log_density")
_SCALARS = tuple(f.name for f in dataclasses.fields(TokenCloud) if f.name not in _ARRAYS)
